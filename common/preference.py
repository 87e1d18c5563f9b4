"""Preference tuning (`train.method: dpo | orpo`) on TRL's own trainers, `DPOTrainer` and
`trl.experimental.orpo.ORPOTrainer`, fed the pair rows of common.pairs; and the held-out preference accuracy that
eval.py reports.

Everything a run does besides the loss comes from the pieces every method shares: the TrainingArguments of
`training.run_arguments` and the callbacks of `callbacks.run_callbacks` (checkpoints, rotation, resume, Ctrl-C, metrics
and TensorBoard, evaluation prompts). What is ours here is small:

- The rows are final, token for token the SFT encoding (common.pairs): DPOTrainer is told not to tokenize them again
  (`PairDPOTrainer._prepare_dataset`), ORPOTrainer turns them into its columns without a tokenizer
  (`PairORPOTrainer.tokenize_row`). The losses, the reference forward and the logged rewards are TRL's, unchanged.
- The reference model. LoRA/QLoRA: the policy with its adapter switched off (no copy of anything). A continued
  adapter (`model.adapter`): TRL's frozen copy of that adapter ("ref"), so the reference is the model training
  started from. Full fine-tuning: a frozen copy of `model.path`, loaded as the policy was.
"""
from __future__ import annotations

import sys

import torch
from trl import DPOConfig, DPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from common.cli import UserError
from common.pairs import PAIR_COLUMNS, Pair, encode_pairs, load_pairs
from common.templates import IGNORE


# ---------------------------------------------------------------- data: the recipe's pairs as rows

def build_pair_datasets(recipe, tokenizer):
    """(train rows, eval rows, stats) of a preference recipe: its pair files read, held out as SFT holds out
    (data.eval_path or data.eval_fraction), each pair fitted into data.max_length."""
    from common.dataset import recipe_conversations
    from common.formats import LoadReport
    from common.templates import get_template

    d, report = recipe.data, LoadReport()
    pairs, held_out = recipe_conversations(recipe, report, load=load_pairs)
    template = get_template(d.template)
    for text in template.notes(tokenizer, [pair.prompt for pair in pairs]):
        report.note(text)
    train_rows, stats = encode_pairs(pairs, tokenizer, template, d.max_length, d.system)
    stats.skipped = len(report.skipped)
    eval_rows = encode_pairs(held_out, tokenizer, template, d.max_length, d.system)[0] if held_out else []
    report.tell()
    if not train_rows:
        raise UserError(f"{', '.join(d.paths)}: no training pair left (records: {stats.records}, "
                        f"dropped: {stats.dropped}, skipped: {stats.skipped})")
    return train_rows, eval_rows, vars(stats)


def format_stats(stats: dict) -> str:
    pairs = max(stats["pairs"], 1)
    lines = [("records", stats["records"]), ("pairs", stats["pairs"]),
             ("tokens per pair: prompt / chosen / rejected",
              f"{stats['prompt_tokens'] / pairs:.0f} / {stats['chosen_tokens'] / pairs:.0f} / "
              f"{stats['rejected_tokens'] / pairs:.0f} (mean)"),
             ("prompts shortened to fit", stats["shortened"]), ("prompt turns dropped", stats["turns_dropped"]),
             ("prompt tokens cut", stats["prompt_tokens_cut"]), ("dropped (an answer alone too long)", stats["dropped"]),
             ("skipped", stats["skipped"])]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in lines)


def print_dry_run(recipe, tokenizer, train_rows: list[dict], stats: dict) -> None:
    from common.report import preview

    d, color = recipe.data, sys.stdout.isatty()
    print(f"recipe {recipe.source}: method {recipe.train.method}, template {d.template}, max_length {d.max_length} "
          "(prompts shortened from the left, answers kept)")
    print(format_stats(stats))
    row = train_rows[0]
    for side in ("chosen", "rejected"):
        ids = row["prompt_ids"] + row[f"{side}_ids"]
        labels = [IGNORE] * len(row["prompt_ids"]) + row[f"{side}_ids"]
        print(f"\nfirst pair, prompt + {side} (scored span marked):")
        print(preview(tokenizer, {"input_ids": ids, "labels": labels}, color))


def summary_lines(recipe, stats: dict) -> list[str]:
    p, method = recipe.preference, recipe.train.method
    reference = ("none (ORPO)" if method == "orpo" else "the model before training: " + (
        "a frozen copy of model.path" if recipe.lora is None else
        "the continued adapter's frozen copy" if recipe.model.adapter else "the adapter switched off"))
    loss = f"DPO {p.loss_type}, beta {p.beta}" if method == "dpo" else f"ORPO, lambda {p.orpo_lambda}"
    return [f"pairs: {stats['pairs']:,} of {stats['records']:,} records (shortened {stats['shortened']}, dropped "
            f"{stats['dropped']}, skipped {stats['skipped']})",
            f"preference: {loss}; reference: {reference}"]


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


def reference_model(recipe, dtype: torch.dtype):
    """Full fine-tuning's reference: model.path again, frozen (LoRA needs none: the adapter is switched off)."""
    from common.modeling import load_causal_lm

    m = recipe.model
    ref = load_causal_lm(m.path, dtype, None, m.trust_remote_code, m.attn_implementation)
    ref.config.use_cache = False
    return ref.eval().requires_grad_(False)


def build_trainer(recipe, model, fast_paths, tokenizer, train_rows: list[dict], eval_rows: list[dict] | None,
                  callbacks: list, dtype: torch.dtype, disable_tqdm: bool):
    """The method's TRL trainer on the pair rows, with the run's arguments and callbacks (as training.build_trainer
    builds SFT's)."""
    from datasets import Dataset

    from common.training import run_arguments, use_run_console

    columns = lambda rows: Dataset.from_dict({k: [r[k] for r in rows] for k in PAIR_COLUMNS})  # noqa: E731
    train, evals = columns(train_rows), columns(eval_rows) if eval_rows else None
    p, max_length = recipe.preference, recipe.data.max_length
    arguments = run_arguments(recipe, model, dtype, evals is not None, disable_tqdm, pack=False)
    common = dict(model=model, train_dataset=train, eval_dataset=evals, processing_class=tokenizer, callbacks=callbacks)
    if recipe.train.method == "dpo":
        config = DPOConfig(**arguments, beta=p.beta, loss_type=[p.loss_type], label_smoothing=p.label_smoothing,
                           max_length=max_length)
        ref = reference_model(recipe, dtype) if recipe.lora is None else None
        trainer = PairDPOTrainer(ref_model=ref, args=config, **common)
        peft_config = getattr(trainer.model, "peft_config", {})
        if recipe.lora is not None and recipe.model.adapter is None and "ref" in peft_config:
            # TRL copies any PeftModel's adapter as the reference ("ref"). A fresh adapter starts at zero (B = 0), so
            # its reference is the base itself: the adapter switched off, which needs neither the copy nor its compute.
            trainer.model.delete_adapter("ref")
        if fast_paths.packed_pairs:  # after DPOTrainer has put its fused head on the model
            from common.acceleration import pack_pairs
            from common.loss import causal_lm_of

            pack_pairs(causal_lm_of(trainer.model))
    else:
        config = ORPOConfig(**arguments, beta=p.orpo_lambda, max_length=max_length, remove_unused_columns=False)
        trainer = PairORPOTrainer(args=config, **common)
    use_run_console(trainer)
    return trainer


# ---------------------------------------------------------------- held-out preference accuracy (eval.py)

@torch.no_grad()
def answer_logps(model, row: dict) -> tuple[list[float], list[int]]:
    """Summed log-probabilities of the chosen and the rejected answer after the prompt, and their token counts: one
    forward of both (padded), the LM head at the answer positions only (common.loss)."""
    from common.loss import labelled_positions, token_losses

    device = next(model.parameters()).device
    sides = [row["prompt_ids"] + row[f"{side}_ids"] for side in ("chosen", "rejected")]
    width = max(len(ids) for ids in sides)
    pad = lambda values, fill: torch.tensor([v + [fill] * (width - len(v)) for v in values], device=device)  # noqa: E731
    labels = pad([[IGNORE] * len(row["prompt_ids"]) + row[f"{side}_ids"] for side in ("chosen", "rejected")], IGNORE)
    inputs = {"input_ids": pad(sides, 0), "attention_mask": pad([[1] * len(ids) for ids in sides], 0), "labels": labels}
    losses = token_losses(model, inputs)
    counts = labelled_positions(labels).sum(dim=1).tolist()
    chosen, rejected = losses.split(counts)
    return [-chosen.sum().item(), -rejected.sum().item()], counts


def preference_accuracy(model, rows: list[dict]) -> dict:
    """Share of pairs whose log-probability margin (chosen - rejected) favours the chosen answer, the mean margin, and
    the same per answer token (which discounts answer length); per pair the margins, for comparing two models."""
    margins, per_token = [], []
    for row in rows:
        (chosen, rejected), (n_chosen, n_rejected) = answer_logps(model, row)
        margins.append(chosen - rejected)
        per_token.append(chosen / max(n_chosen, 1) - rejected / max(n_rejected, 1))
    n = max(len(rows), 1)
    return {"pairs": len(rows), "accuracy": round(sum(m > 0 for m in margins) / n, 4),
            "mean_margin": round(sum(margins) / n, 4),
            "accuracy_per_token": round(sum(m > 0 for m in per_token) / n, 4),
            "mean_margin_per_token": round(sum(per_token) / n, 4), "margins": [round(m, 4) for m in margins]}


def compare(base: dict, tuned: dict) -> dict:
    """Both models' figures, and the share of pairs whose margin grew: DPO's reward accuracy with the base as the
    reference."""
    grew = sum(t > b for b, t in zip(base["margins"], tuned["margins"]))
    return {"base": base, "tuned": tuned, "margin_grew": round(grew / max(len(base["margins"]), 1), 4)}


def markdown(result: dict) -> list[str]:
    b, t = result["base"], result["tuned"]
    return ["", f"Preference pairs: {b['pairs']} held out; margin = log p(chosen) - log p(rejected) after the prompt.", "",
            "| | base | tuned |", "|---|---|---|",
            f"| preference accuracy (margin > 0) | {100 * b['accuracy']:.1f}% | {100 * t['accuracy']:.1f}% |",
            f"| mean margin (nats) | {b['mean_margin']:.3f} | {t['mean_margin']:.3f} |",
            f"| accuracy per answer token | {100 * b['accuracy_per_token']:.1f}% | {100 * t['accuracy_per_token']:.1f}% |",
            f"| mean margin per answer token | {b['mean_margin_per_token']:.4f} | {t['mean_margin_per_token']:.4f} |", "",
            f"The tuned model's margin is larger than the base's on {100 * result['margin_grew']:.0f}% of the pairs."]


def summary(result: dict) -> str:
    b, t = result["base"], result["tuned"]
    return (f"preference accuracy on {b['pairs']} held-out pairs: base {100 * b['accuracy']:.1f}% (mean margin "
            f"{b['mean_margin']:.3f}) -> tuned {100 * t['accuracy']:.1f}% ({t['mean_margin']:.3f}); margin grew on "
            f"{100 * result['margin_grew']:.0f}%")


def pairs_of(records: list) -> list[Pair]:
    return [r for r in records if isinstance(r, Pair)]
