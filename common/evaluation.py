"""Did fine-tuning help? `evaluate`: held-out loss scored exactly as training scores it (its samples, packing and
collation), and answers side by side, for two models that share one load where they can (an adapter and its base:
PEFT switches the adapter off and on). eval.py parses, resolves the models and data, calls it, and writes the report.
"""
from __future__ import annotations

import dataclasses
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from common.cli import UserError
from common.generation import adapter_switch
from common.rewards import units

WHO = ("base", "tuned")
REWARD_PROMPTS = 64  # held-out prompts a rewards run's table answers, at most


# ---------------------------------------------------------------- the two models

class Contestants:
    """`tuned` and what it is compared with (`base`): the tuned adapter's own base (adapter switched off), another
    adapter of the same base (loaded beside it), or any other model (loaded on its own)."""

    def __init__(self, tuned, other=None, dtype: str = "auto"):
        from common.decode_step import FastStep
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
        # The tuned model's compiled decode step, if one is built (chat.py builds them; an evaluation would not pay
        # one back). Not with a second adapter: switching adapters changes the step.
        self.fast = FastStep.for_model(self.model, build=False) if self.other_adapter is None else None

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
            with adapter_switch(self.model, on=False):
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


def held_out_samples(tokenizer, template, conversations, data) -> list[dict]:
    """The samples training would make of these conversations (the `data` section's system prompt, truncation and
    max_length), each token tagged with the conversation it comes from (`owners`)."""
    from common.samples import Stats, encode_conversations

    samples, stats = [], Stats()
    for n, turns in enumerate(conversations):
        rows, _ = encode_conversations([turns], tokenizer, template, data.max_length, data.truncation, data.system,
                                       stats, data.thinking)
        samples += [{**row, "owners": [n] * len(row["input_ids"])} for row in rows]
    return samples


def scoring_rows(samples: list[dict], max_length: int, pad_token_id: int) -> list[dict]:
    """The samples packed into rows of max_length as training packs them (samples.pack_rows) and collated as training
    collates them (TRL's padding-free collator: position ids restart at each sample, whose first label is ignored, so
    no position predicts across a sample boundary); `owners` rides along, token by token."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from common.samples import pack_rows

    collate = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)
    packed = pack_rows(samples, max_length, shuffle=False, seed=0) if samples else []
    return [{**collate([row]), "owners": torch.tensor([row["owners"]])} for row in packed]


@torch.no_grad()
def score_row(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token cross-entropy, owner) at the labelled positions, by training's own loss (common.loss)."""
    from common.loss import labelled_positions, token_losses

    device = next(model.parameters()).device
    batch = {k: inputs[k].to(device) for k in ("input_ids", "position_ids", "labels")}
    return token_losses(model, batch).double().cpu(), inputs["owners"][labelled_positions(inputs["labels"])]


def score(model, rows: list[dict], conversations: int, progress: bool = False, label: str = "") -> Scored:
    """Summed loss and scored tokens per conversation over the collated rows (scoring_rows)."""
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

def answer_facts(completion) -> dict:
    """Tokens, how it ended, the share of repeated 4-grams (4-grams seen earlier in the same answer) and distinct-2
    (distinct bigrams / bigrams), over words (CJK: characters)."""
    from common.rewards import repeated_share

    return {"tokens": completion.completion_tokens, "ended_by": completion.ended_by,
            "repeated_4gram_share": round(repeated_share(completion.text, 4), 4),
            "distinct_2": round(1 - repeated_share(completion.text, 2), 4) if len(units(completion.text)) > 1 else 0.0}


def answer(models: Contestants, template, system: str | None, max_length: int, prompts: list[tuple[str, str]],
           sampling, progress: bool = False) -> list[dict]:
    """Each (prompt, where it comes from) answered by both models through the generation core, the answers of a
    model decoded together (Generator.generate_many): the answer, how it ended, and its answer_facts."""
    from tqdm.auto import tqdm

    from common.generation import Generator

    before = [{"role": "system", "content": system}] if system else []
    answers = [{"prompt": p, "source": where} for p, where in prompts]
    for who in WHO:
        with models.use(who) as model:
            generator = Generator(model, models.tokenizer, template, max_length,
                                  fast=models.fast if who == "tuned" else None)
            with tqdm(total=len(answers), desc=f"answering {who}", disable=not progress, leave=False) as bar:
                completions = generator.generate_many(
                    [before + [{"role": "user", "content": a["prompt"]}] for a in answers], sampling, on_done=bar.update)
            for a, completion in zip(answers, completions):
                a[who], a[f"{who}_stop"], a[f"{who}_facts"] = completion.text, completion.ended_by, answer_facts(completion)
    return answers


# ---------------------------------------------------------------- a rewards run: each reward's mean

def reward_table(models, template, records: list, recipe, sampling, limit: int, progress: bool = False) -> dict:
    """Both models answer up to `limit` held-out prompts (the run's sampling; greedy by default) and the run's rewards
    score the answers: each reward's mean, base vs tuned, with the answers' repeated 4-gram share and length."""
    from tqdm.auto import tqdm

    from common.generation import Generator
    from common.methods.grpo import held_out_prompts
    from common.rewards import check, lost_summary, mean_scores, reward_functions

    problems = []
    check(recipe.rewards, problems)
    if problems:
        raise UserError("the run's rewards: " + "; ".join(problems))
    functions = reward_functions(recipe.rewards, models.tokenizer, template)
    rows = held_out_prompts(records, models.tokenizer, template, recipe.data,
                            recipe.data.max_length - sampling.max_new_tokens)[: max(limit, 0)]
    out = {"prompts": len(rows), "answers": [{"prompt": r["prompt"]} for r in rows]}
    for who in WHO:
        with models.use(who) as model:
            generator = Generator(model, models.tokenizer, template, recipe.data.max_length)
            texts, ids = [], []
            for a in tqdm(out["answers"], desc=f"rewards {who}", disable=not progress, leave=False):
                answering = generator.start(a["prompt"], sampling)
                generator.decoder().run(answering.row)
                completion = answering.completion()
                texts.append(completion.text)
                ids.append(answering.row.answer)
                a[who], a[f"{who}_facts"] = completion.text, answer_facts(completion)
        facts = [a[f"{who}_facts"] for a in out["answers"]]
        n = max(len(facts), 1)
        out[who] = {"rewards": mean_scores(functions, [a["prompt"] for a in out["answers"]], texts, ids),
                    "repeated_4gram_share": round(sum(f["repeated_4gram_share"] for f in facts) / n, 4),
                    "mean_tokens": round(sum(f["tokens"] for f in facts) / n, 1),
                    "cut_at_limit": sum(f["ended_by"] == "length" for f in facts)}
    judges = lost_summary(recipe.rewards)
    if judges:
        out["judges"] = judges
    return out


def reward_markdown(table: dict) -> list[str]:
    b, t = table["base"], table["tuned"]
    show = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731 - a reward with nothing to score (no crisis prompt)
    lines = ["", f"Rewards (the run's `rewards:`) on {table['prompts']} held-out prompts, mean per reward:", "",
             "| | base | tuned |", "|---|---|---|"]
    lines += [f"| {name} | {show(b['rewards'][name])} | {show(t['rewards'][name])} |" for name in b["rewards"]]
    lines += [f"| repeated 4-gram share | {100 * b['repeated_4gram_share']:.1f}% | "
              f"{100 * t['repeated_4gram_share']:.1f}% |",
              f"| mean answer tokens | {b['mean_tokens']} | {t['mean_tokens']} |",
              f"| cut at the length limit | {b['cut_at_limit']} | {t['cut_at_limit']} |"]
    return lines + ["", *table.get("judges", [])]


def reward_summary(table: dict) -> str:
    b, t = table["base"], table["tuned"]
    parts = [f"{name} {'-' if b['rewards'][name] is None else round(b['rewards'][name], 3)} -> "
             f"{'-' if t['rewards'][name] is None else round(t['rewards'][name], 3)}" for name in b["rewards"]]
    return (f"rewards on {table['prompts']} held-out prompts (base -> tuned): " + ", ".join(parts) +
            f"; repeated 4-grams {100 * b['repeated_4gram_share']:.1f}% -> {100 * t['repeated_4gram_share']:.1f}%")


# ---------------------------------------------------------------- the evaluation

@dataclass
class Result:
    """An evaluation: report.json holds it field by field, report.md and `summary` show it."""

    tuned_name: str
    base_name: str
    data: list[str]  # the held-out files, as named
    conversations: int  # held-out conversations with at least one scored token
    base: dict  # Scored.summary(): loss, ppl, tokens
    tuned: dict
    tuned_better: int  # conversations on which the tuned model's loss is lower
    tuned_better_share: float
    per_conversation: list[dict]  # index, tokens, base_loss, tuned_loss
    answers: list[dict]  # prompt, source, and per model (base, tuned): the answer, how it ended, its facts
    settings: dict  # template, truncation, max_length, system, samples, rows, sampling
    # the methods' parts (common/methods: HeldOut), by their key: e.g. "preference" (held-out pairs: accuracy and
    # margins, base vs tuned); report.json holds each as a field of its own
    methods: dict = field(default_factory=dict)
    rewards: dict | None = None  # a rewards run's table (common/methods/grpo.py reward_table)
    benchmarks: dict | None = None  # --tasks: common.benchmarks.run (lm-evaluation-harness), base vs tuned
    judged: dict | None = None  # --judge: common.judging.run (rubric scores, pairwise verdicts, reasons per reply)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        return {**out, **out.pop("methods")}


def evaluate(models: Contestants, recipe, records: list, files: list, limit: int = 8,
             max_new_tokens: int | None = None, temperature: float = 0.0, progress: bool = False) -> Result:
    """The tuned model against the other of `models` on held-out conversations or preference pairs, in the tuned
    model's settings (`recipe`: its run's template, system prompt, truncation, max_length and evaluation section): the
    loss on the answer tokens (a pair's chosen answer),
    answers to the evaluation prompts and to the first user turn of up to `limit` records (greedy unless a temperature
    is given), and each method's own measures of the records of its kind (common/methods: the preference accuracy and
    margins of pairs)."""
    from common.generation import Sampling
    from common.methods.table import held_out_parts
    from common.pairs import as_conversations
    from common.templates import get_template

    conversations = as_conversations(records)  # prompts alone have no answer, so no loss
    d = recipe.data
    template = get_template(d.template, d.thinking)
    samples = held_out_samples(models.tokenizer, template, conversations, d)
    rows = scoring_rows(samples, d.max_length, models.tokenizer.pad_token_id)
    parts = held_out_parts()
    part_rows = {key: part.rows(records, models.tokenizer, template, d) for key, part in parts.items()}
    part_rows = {key: found for key, found in part_rows.items() if found}  # the kinds among the held-out records
    scores, measured = {}, {key: {} for key in part_rows}
    for who in WHO:
        with models.use(who) as model:
            scores[who] = score(model, rows, len(conversations), progress, who)
            for key, found in part_rows.items():
                measured[key][who] = parts[key].measure(model, found)

    sampling = Sampling.from_evaluation(recipe.evaluation, max_new_tokens=max_new_tokens, temperature=temperature)
    prompts = [(p, "evaluation.prompts") for p in recipe.evaluation.prompts] + [
        (turns[0].input, f"held-out conversation {n}") for n, turns in enumerate(conversations[: max(limit, 0)])]
    answers = answer(models, template, d.system, d.max_length, prompts, sampling, progress)
    rewards = None
    if recipe.rewards:  # a run that learnt from rewards: each reward's mean on the held-out prompts, base vs tuned
        rewards = reward_table(models, template, records, recipe, sampling, REWARD_PROMPTS, progress)

    base, tuned = scores["base"], scores["tuned"]
    per = [{"index": n, "tokens": tuned.tokens[n], "base_loss": base.loss_sum[n] / max(base.tokens[n], 1),
            "tuned_loss": tuned.loss_sum[n] / max(tuned.tokens[n], 1)}
           for n in range(len(conversations)) if tuned.tokens[n]]
    better = sum(c["tuned_loss"] < c["base_loss"] for c in per)
    kind = "greedy" if sampling.temperature == 0 else f"temperature {sampling.temperature}"
    return Result(models.names["tuned"], models.names["base"], [str(f) for f in files], len(per), base.summary(),
                  tuned.summary(), better, round(better / max(len(per), 1), 4), per, answers,
                  {"template": template.name, "truncation": d.truncation, "max_length": d.max_length,
                   "system": d.system, "samples": len(samples), "rows": len(rows),
                   "sampling": f"{kind}, max_new_tokens {sampling.max_new_tokens}"},
                  {key: parts[key].compare(m["base"], m["tuned"]) for key, m in measured.items()}, rewards)


# ---------------------------------------------------------------- report

def _parts(result: Result):
    """(the method's HeldOut, its result) for each method part in the result."""
    from common.methods.table import held_out_parts

    parts = held_out_parts()
    return [(parts[key], value) for key, value in result.methods.items()]


def report_markdown(result: Result) -> str:
    from common import benchmarks, judging

    b, t = result.base, result.tuned
    lines = [f"# Evaluation: {result.tuned_name} vs {result.base_name}", "",
             f"Held-out data: {', '.join(result.data)} — {result.conversations} conversations "
             f"({result.settings['template']} template, {result.settings['truncation']} truncation, "
             f"max_length {result.settings['max_length']}); loss on the answer tokens, as training scores them.", "",
             "| | base | tuned |", "|---|---|---|",
             f"| loss (mean over answer tokens) | {b['loss']:.4f} | {t['loss']:.4f} |",
             f"| perplexity | {b['ppl']:.2f} | {t['ppl']:.2f} |",
             f"| answer tokens scored | {b['tokens']} | {t['tokens']} |", "",
             f"The tuned model's loss is lower on {result.tuned_better} of {result.conversations} conversations "
             f"({100 * result.tuned_better_share:.0f}%).",
             *(line for part, value in _parts(result) for line in part.markdown(value)),
             *(reward_markdown(result.rewards) if result.rewards else []),
             *(benchmarks.markdown(result.benchmarks) if result.benchmarks else []),
             *(judging.markdown(result.judged) if result.judged else []), "", "## Per conversation", "",
             "| # | answer tokens | base loss | tuned loss |", "|---|---|---|---|"]
    for c in result.per_conversation:
        lines.append(f"| {c['index']} | {c['tokens']} | {c['base_loss']:.4f} | {c['tuned_loss']:.4f} |")
    lines += ["", f"## Answers ({result.settings['sampling']})", ""]
    for n, a in enumerate(result.answers, 1):
        lines += [f"### {n}. {a['prompt']}", f"*({a['source']})*", ""]
        for who in WHO:
            f = a[f"{who}_facts"]
            lines += [f"**{who}** — {f['tokens']} tokens, ended by {f['ended_by']}, repeated 4-grams "
                      f"{100 * f['repeated_4gram_share']:.0f}%, distinct-2 {100 * f['distinct_2']:.0f}%", "",
                      "> " + (a[who] or "(empty)").replace("\n", "\n> "), ""]
    return "\n".join(lines) + "\n"


def write_report(out_dir, result: Result) -> None:
    from common.artifacts import EVAL_REPORT

    (out_dir / EVAL_REPORT).write_text(json.dumps(result.to_dict(), ensure_ascii=False, indent=2) + "\n",
                                         encoding="utf-8")
    (out_dir / "report.md").write_text(report_markdown(result), encoding="utf-8")


def summary(result: Result) -> str:
    from common import benchmarks, judging

    b, t = result.base, result.tuned
    # Prompts alone (a GRPO run's held-out prompts) have no answer to score: say so rather than a loss over nothing
    loss = ("held-out loss: none (the held-out data has no answers; --data with conversations scores them)"
            if not b["tokens"] else
            f"held-out loss over {b['tokens']} answer tokens of {result.conversations} conversations: "
            f"base {b['loss']:.4f} (ppl {b['ppl']:.2f}) -> tuned {t['loss']:.4f} (ppl {t['ppl']:.2f}); "
            f"tuned lower on {result.tuned_better}/{result.conversations} ({100 * result.tuned_better_share:.0f}%)")
    return (loss
            + "".join(f"\n{part.summary(value)}" for part, value in _parts(result))
            + (f"\n{reward_summary(result.rewards)}" if result.rewards else "")
            + (f"\n{benchmarks.summary(result.benchmarks)}" if result.benchmarks else "")
            + (f"\n{judging.summary(result.judged)}" if result.judged else ""))
