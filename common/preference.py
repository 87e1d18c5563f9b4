"""TRL's preference trainers on our rows: `DPOTrainer` and `trl.experimental.orpo.ORPOTrainer` (train.method dpo and
orpo, common/methods/dpo.py and orpo.py) fed the pair rows of common.pairs, and `KTOTrainer` (train.method kto,
common/methods/kto.py) fed the rated rows of common.unpaired. Each method module builds its trainer from these; this is
the module of theirs that imports TRL.

Everything a run does besides the loss comes from the pieces every method shares: the TrainingArguments of
`training.run_arguments` and the callbacks of `callbacks.run_callbacks` (checkpoints, rotation, resume, Ctrl-C, metrics
and TensorBoard, evaluation prompts). What is ours here is small:

- The rows are final, token for token the SFT encoding (common.pairs, common.unpaired): DPOTrainer and KTOTrainer are
  told not to tokenize them again (`PairDPOTrainer._prepare_dataset`, `RatedKTOTrainer._prepare_dataset`), ORPOTrainer
  turns them into its columns without a tokenizer (`PairORPOTrainer.tokenize_row`). The losses, the reference
  forward and the logged rewards are TRL's, unchanged.
- The reference model. LoRA/QLoRA: the policy with its adapter switched off (no copy of anything). A continued
  adapter (`model.adapter`): TRL's frozen copy of that adapter ("ref"), so the reference is the model training
  started from. Full fine-tuning: a frozen copy of `model.path`, loaded as the policy was.
"""
from __future__ import annotations

import torch
from trl import DPOTrainer, KTOTrainer
from trl.experimental.orpo import ORPOTrainer

from common.pairs import PAIR_COLUMNS
from common.templates import IGNORE
from common.unpaired import RATED_COLUMNS


# ---------------------------------------------------------------- the trainers

class PairDPOTrainer(DPOTrainer):
    """DPOTrainer on rows that already hold prompt_ids/chosen_ids/rejected_ids. TRL 1.16 tokenizes every text dataset
    it is given (its `evaluate` says tokenized datasets pass through; `_prepare_dataset` does not check): this hook
    lets ours through as they are. Anything else is prepared by TRL."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if set(PAIR_COLUMNS) <= set(dataset.column_names):
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)


class PairORPOTrainer(ORPOTrainer):
    """ORPOTrainer on the same rows: `tokenize_row` (its per-row hook) builds its columns from our ids instead of
    tokenizing strings; the labels mask the prompt as TRL's do."""

    def tokenize_row(self, feature, model=None) -> dict:
        prompt = list(feature["prompt_ids"])
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            answer = list(feature[f"{side}_ids"])
            row[f"{side}_input_ids"] = prompt + answer
            row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
            row[f"{side}_labels"] = [IGNORE] * len(prompt) + answer
        return row


class RatedKTOTrainer(KTOTrainer):
    """KTOTrainer on rows that already hold prompt_ids/completion_ids/label. TRL 1.16 extracts, tokenizes and filters
    every dataset it is given (`_prepare_dataset`); this hook lets ours through and adds only what TRL adds to
    tokenized rows: with the KL term (loss_type kto), each row's `KL_completion_ids`, the completions rotated by one
    within each batch of per_device_train_batch_size rows in dataset order ((x1, yn), (x2, y1), ...), as TRL's own
    preparation does; TRL samples KTO batches sequentially, so these are the batches it trains on."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if not set(RATED_COLUMNS) <= set(dataset.column_names):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if not self.calculate_KL:
            return dataset

        def mismatched(batch: dict) -> dict:
            return {"KL_completion_ids": batch["completion_ids"][-1:] + batch["completion_ids"][:-1]}

        return dataset.map(mismatched, batched=True, batch_size=args.per_device_train_batch_size)


def reference_model(recipe, dtype: torch.dtype):
    """Full fine-tuning's reference: model.path again, frozen (LoRA needs none: the adapter is switched off)."""
    from common.modeling import load_causal_lm

    m = recipe.model
    ref = load_causal_lm(m.path, dtype, None, m.trust_remote_code, m.attn_implementation)
    ref.config.use_cache = False
    return ref.eval().requires_grad_(False)


def trainer_inputs(recipe, model, tokenizer, train_rows: list[dict], eval_rows: list[dict] | None, callbacks: list,
                   dtype: torch.dtype, disable_tqdm: bool, columns: tuple[str, ...]) -> tuple[dict, dict]:
    """(the run's TrainingArguments as keywords, the trainer's model/datasets/tokenizer/callbacks): what every
    preference trainer takes, as training.build_trainer gives SFT's. `columns`: the row keys the trainer reads."""
    from datasets import Dataset

    from common.training import run_arguments

    table = lambda rows: Dataset.from_dict({k: [r[k] for r in rows] for k in columns})  # noqa: E731
    train, evals = table(train_rows), table(eval_rows) if eval_rows else None
    arguments = run_arguments(recipe, model, dtype, evals is not None, disable_tqdm, pack=False)
    return arguments, dict(model=model, train_dataset=train, eval_dataset=evals, processing_class=tokenizer,
                           callbacks=callbacks)
