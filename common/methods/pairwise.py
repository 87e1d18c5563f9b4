"""What train.method dpo and orpo share: preference pairs (common/pairs.py: four layouts, encoded token for token as
SFT encodes the prompt and each answer) as rows, their --dry-run, the pairs line of the start-up summary, and their part
of eval.py's report: the held-out preference accuracy and margins, base vs tuned."""
from __future__ import annotations

import sys

from common.cli import UserError
from common.methods.spec import HeldOut
from common.pairs import Pair, encode_pairs, load_pairs
from common.templates import IGNORE


# ---------------------------------------------------------------- data: the recipe's pairs as rows

def build_datasets(recipe, tokenizer):
    """(train rows, eval rows, stats) of a preference recipe: its pair files read, held out as SFT holds out
    (data.eval_path or data.eval_fraction), each pair fitted into data.max_length."""
    return prompted_datasets(recipe, tokenizer, load_pairs, encode_pairs, "training pair")


def prompted_datasets(recipe, tokenizer, load, encode, what: str):
    """(train rows, eval rows, stats) of records that answer a prompt (pairs here, rated answers in kto.py): `load`
    reads the recipe's files, held out as SFT holds out; `encode(records, tokenizer, template, max_length, system)`
    fits each into data.max_length (rows, stats). No row left is an error naming the files."""
    from common.dataset import recipe_conversations
    from common.formats import LoadReport
    from common.templates import THINKING, get_template

    d, report = recipe.data, LoadReport()
    records, held_out = recipe_conversations(recipe, report, load=load)
    if THINKING[d.thinking].drops_reasoning:  # as SFT's conversations (templates.conversation_for)
        records, held_out = ([r.without_reasoning() for r in rs] for rs in (records, held_out))
    template = get_template(d.template, d.thinking)
    for text in template.notes(tokenizer, [r.prompt for r in records]):
        report.note(text)
    train_rows, stats = encode(records, tokenizer, template, d.max_length, d.system)
    stats.skipped = len(report.skipped)
    eval_rows = encode(held_out, tokenizer, template, d.max_length, d.system)[0] if held_out else []
    report.tell()
    if not train_rows:
        raise UserError(f"{', '.join(d.paths)}: no {what} left (records: {stats.records}, "
                        f"dropped: {stats.dropped}, skipped: {stats.skipped})")
    return train_rows, eval_rows, vars(stats)


def format_stats(stats: dict) -> str:
    pairs = max(stats["pairs"], 1)
    lines = [("records", stats["records"]), ("pairs", stats["pairs"]),
             ("tokens per pair: prompt / chosen / rejected",
              f"{stats['prompt_tokens'] / pairs:.0f} / {stats['chosen_tokens'] / pairs:.0f} / "
              f"{stats['rejected_tokens'] / pairs:.0f} (mean)"),
             *fitting(stats)]
    return table(lines)


def fitting(stats: dict) -> list[tuple[str, object]]:
    """What fitting into max_length cost (common.pairs.fit_prompt's counts), for the dry run's table."""
    return [("prompts shortened to fit", stats["shortened"]), ("prompt turns dropped", stats["turns_dropped"]),
            ("prompt tokens cut", stats["prompt_tokens_cut"]), ("dropped (an answer alone too long)", stats["dropped"]),
            ("skipped", stats["skipped"])]


def table(lines: list[tuple[str, object]]) -> str:
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


def pairs_line(stats: dict) -> str:
    return (f"pairs: {stats['pairs']:,} of {stats['records']:,} records (shortened {stats['shortened']}, dropped "
            f"{stats['dropped']}, skipped {stats['skipped']})")


def reference(recipe) -> str:
    """What the policy is measured against (DPO; KTO too): the model training started from."""
    return "the model before training: " + (
        "a frozen copy of model.path" if recipe.lora is None else
        "the continued adapter's frozen copy" if recipe.model.adapter else "the adapter switched off")


# ---------------------------------------------------------------- held-out preference accuracy (eval.py)

def answer_logps(model, row: dict) -> tuple[list[float], list[int]]:
    """Summed log-probabilities of the chosen and the rejected answer after the prompt, and their token counts: one
    forward of both (padded), the LM head at the answer positions only (common.loss)."""
    return completion_logps(model, row["prompt_ids"], [row["chosen_ids"], row["rejected_ids"]])


def completion_logps(model, prompt: list[int], completions: list[list[int]]) -> tuple[list[float], list[int]]:
    """Summed log-probabilities of each completion after the prompt and their token counts, in one padded forward."""
    import torch

    from common.loss import labelled_positions, token_losses

    device = next(model.parameters()).device
    sides = [prompt + c for c in completions]
    width = max(len(ids) for ids in sides)
    def pad(values, fill):
        return torch.tensor([v + [fill] * (width - len(v)) for v in values], device=device)

    labels = pad([[IGNORE] * len(prompt) + c for c in completions], IGNORE)
    inputs = {"input_ids": pad(sides, 0), "attention_mask": pad([[1] * len(ids) for ids in sides], 0), "labels": labels}
    with torch.no_grad():
        losses = token_losses(model, inputs)
    counts = labelled_positions(labels).sum(dim=1).tolist()
    return [-part.sum().item() for part in losses.split(counts)], counts


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
    return ["", f"Preference pairs: {b['pairs']} held out; margin = log p(chosen) - log p(rejected) after the "
                "prompt.", "",
            "| | base | tuned |", "|---|---|---|",
            f"| preference accuracy (margin > 0) | {100 * b['accuracy']:.1f}% | {100 * t['accuracy']:.1f}% |",
            f"| mean margin (nats) | {b['mean_margin']:.3f} | {t['mean_margin']:.3f} |",
            f"| accuracy per answer token | {100 * b['accuracy_per_token']:.1f}% | "
            f"{100 * t['accuracy_per_token']:.1f}% |",
            f"| mean margin per answer token | {b['mean_margin_per_token']:.4f} | "
            f"{t['mean_margin_per_token']:.4f} |", "",
            f"The tuned model's margin is larger than the base's on {100 * result['margin_grew']:.0f}% of the pairs."]


def summary(result: dict) -> str:
    b, t = result["base"], result["tuned"]
    return (f"preference accuracy on {b['pairs']} held-out pairs: base {100 * b['accuracy']:.1f}% (mean margin "
            f"{b['mean_margin']:.3f}) -> tuned {100 * t['accuracy']:.1f}% ({t['mean_margin']:.3f}); margin grew on "
            f"{100 * result['margin_grew']:.0f}%")


def held_out_rows(records: list, tokenizer, template, data) -> list[dict]:
    pairs = [r for r in records if isinstance(r, Pair)]
    return encode_pairs(pairs, tokenizer, template, data.max_length, data.system)[0]


HELD_OUT = HeldOut("preference", held_out_rows, preference_accuracy, compare, markdown, summary)
