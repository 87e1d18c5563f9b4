"""train.method kto: Kahneman-Tversky Optimization on single answers rated good or bad (common/unpaired.py: TRL's
conversational and plain layouts, LLaMA-Factory's kto_tag layout, the web page's thumbs up / down), TRL's KTOTrainer
with its loss, the `kto` section's beta, desirable_weight, undesirable_weight and loss_type; the reference is the model
training started from, as for DPO (common/preference.py).

TRL's KTO trains on batches in dataset order (its KL term pairs each prompt with another row's answer of the same
batch), so the rows are shuffled here once, with train.seed: a ratings file comes in the order answers were rated,
often a run of one label or one conversation. eval.py: the held-out rated answers' implicit reward (the log-probability
ratio of the answer, tuned vs base) and how often its sign agrees with the rating."""
from __future__ import annotations

import random
import sys

from common.methods import pairwise
from common.methods.spec import HeldOut, Method
from common.report import dump_dataset
from common.pairs import is_single_rating
from common.templates import IGNORE
from common.unpaired import RATED_COLUMNS, RATED_READERS, Rated, encode_all, load_rated

# TRL's recommended range of desirable_weight * good / (undesirable_weight * bad): [1, 4/3] (the KTO paper, eq. 8)
HIGH = 4 / 3


def shuffled(items: list, seed: int) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


# ---------------------------------------------------------------- data

def weighted_ratio(stats: dict, kto) -> float:
    """desirable_weight * good / (undesirable_weight * bad): what TRL recommends to keep in [1, 4/3]."""
    return kto.desirable_weight * max(stats["desirable"], 1) / (kto.undesirable_weight * max(stats["undesirable"], 1))


def balance(stats: dict, kto) -> str | None:
    """TRL's advice when good and bad answers are not as many (its KTOTrainer warns the same from its own
    preparation, which our rows skip): the weighted ratio of good to bad outside [1, 4/3], and the weights that bring
    it back, either one."""
    good, bad = max(stats["desirable"], 1), max(stats["undesirable"], 1)
    ratio = weighted_ratio(stats, kto)
    if good == bad or 1 <= ratio <= HIGH:
        return None
    d_low = bad * kto.undesirable_weight / good
    u_high = good * kto.desirable_weight / bad
    return (f"{stats['desirable']} good and {stats['undesirable']} bad answers: desirable_weight * good / "
            f"(undesirable_weight * bad) = {ratio:.2f}, outside the [1, 1.33] TRL recommends; set either "
            f"kto.desirable_weight in [{d_low:.2f}, {d_low * HIGH:.2f}] or kto.undesirable_weight in "
            f"[{u_high / HIGH:.2f}, {u_high:.2f}] (not both)")


def build_datasets(recipe, tokenizer):
    """(train rows, eval rows, stats): the rated answers read and held out as SFT holds out, fitted into
    data.max_length, the training rows shuffled with train.seed; a warning when good and bad are out of balance."""
    train_rows, eval_rows, stats = pairwise.prompted_datasets(recipe, tokenizer, load_rated, encode_all, "rated answer")
    advice = balance(stats, recipe.kto)
    if advice:
        print(f"warning: {advice}", file=sys.stderr)
    return shuffled(train_rows, recipe.train.seed), eval_rows, stats


def format_stats(stats: dict, kto) -> str:
    n = max(stats["examples"], 1)
    lines = [("records", stats["records"]), ("rated answers", stats["examples"]),
             ("good / bad", f"{stats['desirable']} / {stats['undesirable']}"),
             ("weighted good : bad", f"{weighted_ratio(stats, kto):.2f} (desirable_weight {kto.desirable_weight}, "
                                     f"undesirable_weight {kto.undesirable_weight}; TRL recommends 1 to 1.33)"),
             ("tokens per answer: prompt / answer", f"{stats['prompt_tokens'] / n:.0f} / "
                                                    f"{stats['completion_tokens'] / n:.0f} (mean)"),
             *pairwise.fitting(stats)]
    return pairwise.table(lines)


def print_dry_run(recipe, tokenizer, train_rows: list[dict], stats: dict) -> None:
    from common.report import preview

    d, k = recipe.data, recipe.kto
    print(f"recipe {recipe.source}: method kto, template {d.template}, max_length {d.max_length} (prompts shortened "
          "from the left, answers kept)")
    print(format_stats(stats, k))
    for label, name in ((True, "good"), (False, "bad")):
        row = next((r for r in train_rows if r["label"] == label), None)
        if row is not None:
            print(f"\nfirst {name} answer, prompt + answer (scored span marked):")
            print(preview(tokenizer, {"input_ids": row["prompt_ids"] + row["completion_ids"],
                                      "labels": [IGNORE] * len(row["prompt_ids"]) + row["completion_ids"]},
                          sys.stdout.isatty()))


def summary_lines(recipe, stats: dict) -> list[str]:
    k = recipe.kto
    return [f"rated answers: {stats['examples']:,} of {stats['records']:,} records, {stats['desirable']:,} good / "
            f"{stats['undesirable']:,} bad (shortened {stats['shortened']}, dropped {stats['dropped']}, skipped "
            f"{stats['skipped']})",
            f"kto: {k.loss_type}, beta {k.beta}, weights desirable {k.desirable_weight} / undesirable "
            f"{k.undesirable_weight} (weighted good : bad {weighted_ratio(stats, k):.2f}, TRL recommends 1 to 1.33); "
            f"reference: {pairwise.reference(recipe)}"]


def check(recipe, problems: list[str]) -> None:
    k = recipe.kto
    for key in ("beta", "desirable_weight", "undesirable_weight"):
        if getattr(k, key) <= 0:
            problems.append(f"`kto.{key}`: got {getattr(k, key)}, expected > 0")
    if k.loss_type == "kto" and recipe.train.batch_size < 2:
        problems.append("`train.batch_size`: kto's KL term pairs each prompt with another answer of its batch: set "
                        "train.batch_size: 2 or more (or kto.loss_type: apo_zero_unpaired, which has no KL term)")


# ---------------------------------------------------------------- the trainer

def build_trainer(recipe, model, fast_paths, tokenizer, train_rows, eval_rows, callbacks, dtype, disable_tqdm):
    from trl import KTOConfig

    from common.preference import RatedKTOTrainer, reference_model, trainer_inputs
    from common.training import use_run_console

    k = recipe.kto
    arguments, inputs = trainer_inputs(recipe, model, tokenizer, train_rows, eval_rows, callbacks, dtype, disable_tqdm,
                                       RATED_COLUMNS)
    config = KTOConfig(**arguments, beta=k.beta, desirable_weight=k.desirable_weight,
                       undesirable_weight=k.undesirable_weight, loss_type=k.loss_type,
                       max_length=recipe.data.max_length)
    ref = reference_model(recipe, dtype) if recipe.lora is None else None
    trainer = RatedKTOTrainer(ref_model=ref, args=config, **inputs)
    if recipe.lora is not None and recipe.model.adapter is None and "ref" in getattr(trainer.model, "peft_config", {}):
        # as for DPO: a fresh adapter's reference is the base, the adapter switched off; TRL's copy is not needed
        trainer.model.delete_adapter("ref")
    use_run_console(trainer)
    return trainer


# ---------------------------------------------------------------- held-out rated answers (eval.py)

def held_out_rows(records: list, tokenizer, template, data) -> list[dict]:
    return encode_all([r for r in records if isinstance(r, Rated)], tokenizer, template, data.max_length,
                      data.system)[0]


def answer_logps(model, rows: list[dict]) -> dict:
    """Each rated answer's summed log-probability after its prompt, with its rating."""
    logps = [pairwise.completion_logps(model, row["prompt_ids"], [row["completion_ids"]])[0][0] for row in rows]
    return {"examples": len(rows), "labels": [bool(row["label"]) for row in rows],
            "logps": [round(x, 4) for x in logps]}


def compare(base: dict, tuned: dict) -> dict:
    """KTO's implicit reward of each held-out answer with the base as the reference, in nats (TRL logs it times
    beta): log p_tuned(answer) - log p_base(answer). Training should raise it for good answers and lower it for bad
    ones: the accuracy is the share whose sign agrees with the rating, the margin the good answers' mean reward minus
    the bad ones'."""
    rewards = [t - b for b, t in zip(base["logps"], tuned["logps"])]
    labels = base["labels"]
    good = [r for r, label in zip(rewards, labels) if label]
    bad = [r for r, label in zip(rewards, labels) if not label]
    mean = lambda values: round(sum(values) / len(values), 4) if values else None  # noqa: E731
    agree = sum((r > 0) == label for r, label in zip(rewards, labels))
    return {"examples": len(rewards), "good": len(good), "bad": len(bad),
            "accuracy": round(agree / max(len(rewards), 1), 4), "reward_good": mean(good), "reward_bad": mean(bad),
            "margin": round(mean(good) - mean(bad), 4) if good and bad else None,
            "rewards": [round(r, 4) for r in rewards], "labels": labels}


def _nats(value) -> str:
    return "-" if value is None else f"{value:+.3f}"


def markdown(result: dict) -> list[str]:
    return ["", f"Rated answers: {result['examples']} held out ({result['good']} good, {result['bad']} bad); reward = "
                "log p_tuned(answer) - log p_base(answer) after the prompt (KTO's implicit reward over beta).", "",
            "| | held out |", "|---|---|",
            f"| rating accuracy (reward > 0 for good, < 0 for bad) | {100 * result['accuracy']:.1f}% |",
            f"| mean reward of good answers (nats) | {_nats(result['reward_good'])} |",
            f"| mean reward of bad answers (nats) | {_nats(result['reward_bad'])} |",
            f"| reward margin, good - bad | {_nats(result['margin'])} |"]


def summary(result: dict) -> str:
    return (f"rated answers: {result['examples']} held out, rating accuracy {100 * result['accuracy']:.1f}%, reward "
            f"good {_nats(result['reward_good'])} / bad {_nats(result['reward_bad'])} "
            f"(margin {_nats(result['margin'])})")


HELD_OUT = HeldOut("kto", held_out_rows, answer_logps, compare, markdown, summary)

METHOD = Method(
    name="kto", kind="rated answers", readers=RATED_READERS, load=load_rated, claims=is_single_rating,
    build_datasets=build_datasets, print_dry_run=print_dry_run, dump_dataset=dump_dataset,
    summary_lines=summary_lines, build_trainer=build_trainer,
    keys={"kto": ("beta", "desirable_weight", "undesirable_weight", "loss_type")}, check=check, held_out=HELD_OUT)
