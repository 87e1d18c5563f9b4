"""train.method dpo: Direct Preference Optimization on preference pairs (common/pairs.py), TRL's DPOTrainer with its
losses (`preference.loss_type`), beta and label smoothing; the reference is the model training started from
(common/preference.py). Packed pairs (`train.fast_paths: packed_pairs`) put a batch's pairs in one row."""
from __future__ import annotations

from common.methods import pairwise
from common.methods.spec import Method
from common.pairs import PAIR_READERS, is_pair_record, load_pairs
from common.report import dump_dataset


def summary_lines(recipe, stats: dict) -> list[str]:
    p = recipe.preference
    return [pairwise.pairs_line(stats), f"preference: DPO {p.loss_type}, beta {p.beta}; reference: "
                                        f"{pairwise.reference(recipe)}"]


def build_trainer(recipe, model, fast_paths, tokenizer, train_rows, eval_rows, callbacks, dtype, disable_tqdm):
    from trl import DPOConfig

    from common.pairs import PAIR_COLUMNS
    from common.training import use_run_console
    from common.preference import PairDPOTrainer, reference_model, trainer_inputs

    p = recipe.preference
    arguments, inputs = trainer_inputs(recipe, model, tokenizer, train_rows, eval_rows, callbacks, dtype, disable_tqdm,
                                       PAIR_COLUMNS)
    config = DPOConfig(**arguments, beta=p.beta, loss_type=[p.loss_type], label_smoothing=p.label_smoothing,
                       max_length=recipe.data.max_length)
    ref = reference_model(recipe, dtype) if recipe.lora is None else None
    trainer = PairDPOTrainer(ref_model=ref, args=config, **inputs)
    peft_config = getattr(trainer.model, "peft_config", {})
    if recipe.lora is not None and recipe.model.adapter is None and "ref" in peft_config:
        # TRL copies any PeftModel's adapter as the reference ("ref"). A fresh adapter starts at zero (B = 0), so its
        # reference is the base itself: the adapter switched off, which needs neither the copy nor its compute.
        trainer.model.delete_adapter("ref")
    if fast_paths.packed_pairs:  # after DPOTrainer has put its fused head on the model
        from common.acceleration import pack_pairs
        from common.loss import causal_lm_of

        pack_pairs(causal_lm_of(trainer.model))
    use_run_console(trainer)
    return trainer


METHOD = Method(
    name="dpo", kind="pairs", readers=PAIR_READERS, load=load_pairs, claims=is_pair_record,
    build_datasets=pairwise.build_datasets, print_dry_run=pairwise.print_dry_run, dump_dataset=dump_dataset,
    summary_lines=summary_lines, build_trainer=build_trainer,
    keys={"preference": ("beta", "loss_type", "label_smoothing")}, held_out=pairwise.HELD_OUT)
