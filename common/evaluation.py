"""Did fine-tuning help? Held-out loss scored exactly as training scores it, and answers side by side, for two models
that share one load where they can (an adapter and its base: PEFT switches the adapter off and on).
"""
from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from common.cli import UserError
from common.templates import IGNORE


# ---------------------------------------------------------------- the two models

class Contestants:
    """`tuned` and what it is compared with (`base`): the tuned adapter's own base (adapter switched off), another
    adapter of the same base (loaded beside it), or any other model (loaded on its own)."""

    def __init__(self, tuned, other=None, dtype: str = "auto"):
        from common.modeling import load_for_generation

        self.model, self.tokenizer = load_for_generation(tuned, dtype)
        self.names = {"tuned": tuned.name, "base": other.name if other else f"{tuned.model} (adapter off)"}
        self.other_model, self.other_adapter = None, None
        if other is None:
            if tuned.adapter is None:
                raise UserError(f"{tuned.model} is a full model without an adapter: there is no base to switch back "
                                "to; pass --compare OTHER (the base model, or another run or checkpoint)")
        elif other.adapter is not None and tuned.adapter is not None and other.model.resolve() == tuned.model.resolve():
            self.model.load_adapter(str(other.adapter), adapter_name="other")  # one base, two adapters
            self.other_adapter = "other"
        else:
            self.other_model = load_for_generation(other, dtype)[0]

    @contextmanager
    def use(self, which: str):
        """The model to run as `tuned` or `base`."""
        if which == "tuned":
            if self.other_adapter:
                self.model.set_adapter("default")
            yield self.model
        elif self.other_model is not None:
            yield self.other_model
        elif self.other_adapter:
            self.model.set_adapter(self.other_adapter)
            try:
                yield self.model
            finally:
                self.model.set_adapter("default")
        else:
            with self.model.disable_adapter():
                yield self.model


# ---------------------------------------------------------------- held-out loss

@dataclass
class Scored:
    """Summed cross-entropy and scored (labelled) tokens, per conversation."""

    loss_sum: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return sum(self.loss_sum) / max(sum(self.tokens), 1)

    def summary(self) -> dict:
        return {"loss": round(self.loss, 6), "ppl": round(math.exp(min(self.loss, 50)), 4), "tokens": sum(self.tokens)}


def pack(samples: list[tuple[int, list[int], list[int]]], max_tokens: int) -> list[list[tuple[int, list[int], list[int]]]]:
    """(owner, ids, labels) samples, in order, into rows of at most max_tokens (a longer sample has a row of its own)."""
    rows, row, size = [], [], 0
    for sample in samples:
        if row and size + len(sample[1]) > max_tokens:
            rows.append(row)
            row, size = [], 0
        row.append(sample)
        size += len(sample[1])
    return rows + ([row] if row else [])


def row_inputs(row) -> dict:
    """A packed row as the padding-free collator builds it for training: samples end to end, position ids restarting
    at 0, the first label of each sample ignored (so no position predicts across a sample boundary)."""
    ids, labels, positions, owners = [], [], [], []
    for owner, sample_ids, sample_labels in row:
        ids += sample_ids
        labels += [IGNORE] + list(sample_labels[1:])
        positions += range(len(sample_ids))
        owners += [owner] * len(sample_ids)
    as_row = lambda values: torch.tensor([values])  # noqa: E731
    return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(positions), "owners": as_row(owners)}


@torch.no_grad()
def score_row(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token cross-entropy, owner) at the labelled positions: the LM head runs only there, as training's loss
    (common.training.Trainer.compute_loss) computes it."""
    device = next(model.parameters()).device
    labels = inputs["labels"].to(device)
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE  # position i predicts token i + 1
    logits = model(input_ids=inputs["input_ids"].to(device), position_ids=inputs["position_ids"].to(device),
                   use_cache=False, logits_to_keep=keep).logits
    ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels[:, 1:][keep[:, :-1]],
                                           reduction="none")
    return ce.double().cpu(), inputs["owners"][keep.cpu()]


def score(model, rows: list[dict], conversations: int, progress: bool = False, label: str = "") -> Scored:
    from tqdm.auto import tqdm

    scored = Scored([0.0] * conversations, [0] * conversations)
    for inputs in tqdm(rows, desc=f"scoring {label}".strip(), disable=not progress, leave=False):
        try:
            ce, owners = score_row(model, inputs)
        except IndexError as e:  # token ids beyond the embedding: the tokenizer is not this model's
            raise UserError(f"the tokenizer's ids do not fit the model's vocabulary ({e}): use the model's own tokenizer") from None
        for owner, value in zip(owners.tolist(), ce.tolist()):
            scored.loss_sum[owner] += value
            scored.tokens[owner] += 1
    return scored


# ---------------------------------------------------------------- answers

UNITS = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]|[^\W_]+|[^\w\s]")


def units(text: str) -> list[str]:
    """Words of space-separated scripts, single characters of CJK ones, punctuation: so that repetition reads alike
    in Chinese and English."""
    return UNITS.findall(text)


def answer_facts(completion) -> dict:
    """Tokens, how it ended, the share of repeated 4-grams (4-grams seen earlier in the same answer) and distinct-2
    (distinct bigrams / bigrams), over words (CJK: characters)."""
    u = units(completion.text)
    grams4 = [tuple(u[i:i + 4]) for i in range(len(u) - 3)]
    seen, repeated = set(), 0
    for g in grams4:
        repeated += g in seen
        seen.add(g)
    grams2 = [tuple(u[i:i + 2]) for i in range(len(u) - 1)]
    return {"tokens": completion.completion_tokens, "ended_by": completion.ended_by,
            "repeated_4gram_share": round(repeated / len(grams4), 4) if grams4 else 0.0,
            "distinct_2": round(len(set(grams2)) / len(grams2), 4) if grams2 else 0.0}


# ---------------------------------------------------------------- report

def report_markdown(result: dict) -> str:
    from common.preference import markdown as preference_markdown

    b, t = result["base"], result["tuned"]
    lines = [f"# Evaluation: {result['tuned_name']} vs {result['base_name']}", "",
             f"Held-out data: {', '.join(result['data'])} — {result['conversations']} conversations "
             f"({result['settings']['template']} template, {result['settings']['truncation']} truncation, "
             f"max_length {result['settings']['max_length']}); loss on the answer tokens, as training scores them.", "",
             "| | base | tuned |", "|---|---|---|",
             f"| loss (mean over answer tokens) | {b['loss']:.4f} | {t['loss']:.4f} |",
             f"| perplexity | {b['ppl']:.2f} | {t['ppl']:.2f} |",
             f"| answer tokens scored | {b['tokens']} | {t['tokens']} |", "",
             f"The tuned model's loss is lower on {result['tuned_better']} of {result['conversations']} conversations "
             f"({100 * result['tuned_better_share']:.0f}%).",
             *(preference_markdown(result["preference"]) if "preference" in result else []), "", "## Per conversation", "",
             "| # | answer tokens | base loss | tuned loss |", "|---|---|---|---|"]
    for c in result["per_conversation"]:
        lines.append(f"| {c['index']} | {c['tokens']} | {c['base_loss']:.4f} | {c['tuned_loss']:.4f} |")
    lines += ["", f"## Answers ({result['settings']['sampling']})", ""]
    for n, a in enumerate(result["answers"], 1):
        lines += [f"### {n}. {a['prompt']}", f"*({a['source']})*", ""]
        for who in ("base", "tuned"):
            f = a[f"{who}_facts"]
            lines += [f"**{who}** — {f['tokens']} tokens, ended by {f['ended_by']}, repeated 4-grams "
                      f"{100 * f['repeated_4gram_share']:.0f}%, distinct-2 {100 * f['distinct_2']:.0f}%", "",
                      "> " + (a[who] or "(empty)").replace("\n", "\n> "), ""]
    return "\n".join(lines) + "\n"


def write_report(out_dir, result: dict) -> None:
    (out_dir / "report.json").write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(report_markdown(result), encoding="utf-8")


def summary(result: dict) -> str:
    b, t = result["base"], result["tuned"]
    return (f"held-out loss over {b['tokens']} answer tokens of {result['conversations']} conversations: "
            f"base {b['loss']:.4f} (ppl {b['ppl']:.2f}) -> tuned {t['loss']:.4f} (ppl {t['ppl']:.2f}); "
            f"tuned lower on {result['tuned_better']}/{result['conversations']} ({100 * result['tuned_better_share']:.0f}%)")
