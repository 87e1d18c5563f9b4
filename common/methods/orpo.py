"""train.method orpo: Odds Ratio Preference Optimization on preference pairs (common/pairs.py), TRL's
`trl.experimental.orpo.ORPOTrainer`: the chosen answer's NLL plus `preference.orpo_lambda` times the odds-ratio term;
no reference model."""
from __future__ import annotations

from common.methods import pairwise
from common.methods.spec import Method
from common.pairs import PAIR_READERS, is_pair_record, load_pairs
from common.report import dump_dataset


def summary_lines(recipe, stats: dict) -> list[str]:
    return [pairwise.pairs_line(stats),
            f"preference: ORPO, lambda {recipe.preference.orpo_lambda}; reference: none (ORPO)"]


def build_trainer(recipe, model, fast_paths, tokenizer, train_rows, eval_rows, callbacks, dtype, disable_tqdm):
    from trl.experimental.orpo import ORPOConfig

    from common.pairs import PAIR_COLUMNS
    from common.training import use_run_console
    from common.preference import PairORPOTrainer, trainer_inputs

    arguments, inputs = trainer_inputs(recipe, model, tokenizer, train_rows, eval_rows, callbacks, dtype, disable_tqdm,
                                       PAIR_COLUMNS)
    config = ORPOConfig(**arguments, beta=recipe.preference.orpo_lambda, max_length=recipe.data.max_length,
                        remove_unused_columns=False)
    trainer = PairORPOTrainer(args=config, **inputs)
    use_run_console(trainer)
    return trainer


METHOD = Method(
    name="orpo", kind="pairs", readers=PAIR_READERS, load=load_pairs, claims=is_pair_record,
    build_datasets=pairwise.build_datasets, print_dry_run=pairwise.print_dry_run, dump_dataset=dump_dataset,
    summary_lines=summary_lines, build_trainer=build_trainer, keys={"preference": ("orpo_lambda",)},
    held_out=pairwise.HELD_OUT)
