"""train.method grpo: online RL from rewards on prompts (common/prompts.py: conversation, pair or prompt-only files),
TRL's GRPOTrainer with the recipe's `rewards:` (common/rewards.py) and `grpo` section; the trainer pieces are in
common/grpo.py. eval.py reports each reward's mean on held-out prompts, base vs tuned."""
from __future__ import annotations

import sys

from common.cli import UserError
from common.methods.spec import Method
from common.prompts import PROMPT_READERS, encode_prompts, is_prompt_record, load_prompts
from common.report import dump_dataset


def build_datasets(recipe, tokenizer):
    """(train rows, eval rows, stats): the recipe's prompts, each fitted into data.max_length minus the completion.
    Held-out prompts (data.eval_path / eval_fraction) are eval.py's; training does not score them."""
    from common.dataset import recipe_conversations
    from common.formats import LoadReport
    from common.templates import get_template

    d, report = recipe.data, LoadReport()
    prompts, held_out = recipe_conversations(recipe, report, load=load_prompts)
    template = get_template(d.template)
    for text in template.notes(tokenizer, [p.turns for p in prompts]):
        report.note(text)
    rows, stats = encode_prompts(prompts, tokenizer, template, budget(recipe), d.system)
    stats.skipped = len(report.skipped)
    report.tell()
    if not rows:
        raise UserError(f"{', '.join(d.paths)}: no prompt left (read: {stats.records}, dropped as too long: "
                        f"{stats.dropped}, skipped: {stats.skipped})")
    return rows, [], {k: v for k, v in vars(stats).items() if k != "lengths"}


def budget(recipe) -> int:
    return recipe.data.max_length - recipe.grpo.max_completion_length


def print_dry_run(recipe, tokenizer, train_rows, stats) -> None:
    from common.rewards import summary_line

    d, g = recipe.data, recipe.grpo
    print(f"recipe {recipe.source}: method grpo, template {d.template}, prompts of up to {budget(recipe)} tokens "
          f"(data.max_length {d.max_length} - grpo.max_completion_length {g.max_completion_length})")
    print("\n".join(f"  {k:<14} {v}" for k, v in stats.items()))
    print(summary_line(recipe.rewards))
    start, end = ("\033[32m", "\033[0m") if sys.stdout.isatty() else ("[[", "]]")
    print("\nfirst prompt, as the model sees it, and where its completions go (the trained span, marked):")
    print(tokenizer.decode(train_rows[0]["prompt_ids"]) + f"{start}(a group of {g.num_generations} completions of up "
          f"to {g.max_completion_length} tokens, sampled){end}")


def memory_estimate(recipe) -> float | None:
    """A rough peak in GiB for one step, from the model's config.json (no weights loaded): the weights, and per micro-
    batch of completions the float32 logits and their log-softmax over prompt + completion (GRPO's largest tensors
    on a small model) plus the activations kept for the backward. None when the config cannot be read."""
    import json
    from pathlib import Path

    from common.precision import resolve

    try:
        config = json.loads(Path(recipe.model.path, "config.json").read_text(encoding="utf-8"))
        config = config.get("text_config", config)
        h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
        inter = config.get("intermediate_size", 4 * h)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    params = vocab * h * (1 if config.get("tie_word_embeddings") else 2) + layers * (4 * h * h + 3 * h * inter)
    weight_bytes = 0.5 if recipe.model.quantization == "4bit" else 1 if recipe.model.quantization else (
        resolve(recipe.model.dtype).dtype.itemsize)
    tokens = recipe.train.batch_size * recipe.data.max_length
    logits = tokens * vocab * 4 * 3  # logits, log-softmax and its gradient, float32
    activations = tokens * h * layers * 16 * (0.25 if recipe.train.gradient_checkpointing else 1)
    return (params * weight_bytes + logits + activations) / 2 ** 30


def machine_memory() -> float | None:
    """GiB of the GPU, else of the machine."""
    import os

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError, AttributeError):
        return None


def check(recipe, problems: list[str]) -> None:
    """The group against the batch, the completion against the context, sampling, rewards, and memory."""
    g, t = recipe.grpo, recipe.train
    if not recipe.rewards:
        problems.append("train.method grpo learns from `rewards:`: list at least one (e.g. `- repetition: {n: 4}`)")
    if g.num_generations < 2:
        problems.append(f"`grpo.num_generations`: got {g.num_generations}, expected at least 2 (a group compares "
                        "its completions)")
    elif (t.batch_size * t.grad_accum) % g.num_generations:
        problems.append(f"`train.batch_size` x `train.grad_accum` ({t.batch_size} x {t.grad_accum}) counts "
                        f"completions and must be a multiple of `grpo.num_generations` ({g.num_generations})")
    if g.max_completion_length < 1:
        problems.append(f"`grpo.max_completion_length`: got {g.max_completion_length}, expected at least 1")
    elif budget(recipe) < 8:
        problems.append(f"`grpo.max_completion_length` ({g.max_completion_length}) leaves no room for a prompt in "
                        f"`data.max_length` ({recipe.data.max_length}): prompt + completion must fit it")
    if g.temperature <= 0 or not 0 < g.top_p <= 1 or g.top_k < 0:
        problems.append("`grpo.temperature` must be > 0, `grpo.top_p` in (0, 1], `grpo.top_k` >= 0 (GRPO samples)")
    if g.beta < 0 or g.epsilon <= 0 or g.num_iterations < 1:
        problems.append("`grpo.beta` >= 0, `grpo.epsilon` > 0 and `grpo.num_iterations` >= 1 expected")
    need, have = memory_estimate(recipe), machine_memory()
    if need is not None and have is not None and need > have:
        problems.append(f"one GRPO step needs about {need:.1f} GiB (weights, and logits over {t.batch_size} x "
                        f"{recipe.data.max_length} tokens), more than the {have:.1f} GiB here: lower train.batch_size "
                        "(raise train.grad_accum), data.max_length or grpo.max_completion_length")


def summary_lines(recipe, stats: dict) -> list[str]:
    from common.rewards import summary_line

    g, t = recipe.grpo, recipe.train
    need = memory_estimate(recipe)
    return [f"prompts: {stats['prompts']:,} of {stats['records']:,} (shortened {stats['shortened']}, dropped "
            f"{stats['dropped']}, skipped {stats['skipped']}), up to {stats['longest']} tokens",
            f"grpo: groups of {g.num_generations} completions of up to {g.max_completion_length} tokens, "
            f"{t.batch_size * t.grad_accum // g.num_generations} prompt(s) a step; temperature {g.temperature}, "
            f"top_p {g.top_p}, top_k {g.top_k}; loss {g.loss_type}, beta {g.beta}; rollouts by "
            f"{'the batched decoder' if g.fast_rollouts else 'TRL generate()'}"
            + (f"; about {need:.1f} GiB a step (estimate)" if need is not None else ""),
            summary_line(recipe.rewards)]


def build_trainer(*args, **kwargs):
    from common.grpo import build_trainer

    return build_trainer(*args, **kwargs)


METHOD = Method(
    name="grpo", kind="prompts", readers=PROMPT_READERS, load=load_prompts, claims=is_prompt_record,
    build_datasets=build_datasets, print_dry_run=print_dry_run, dump_dataset=dump_dataset,
    summary_lines=summary_lines, build_trainer=build_trainer, packs=False, check=check,
    keys={"grpo": ("num_generations", "max_completion_length", "temperature", "top_p", "top_k", "min_p",
                   "repetition_penalty", "beta", "loss_type", "epsilon", "scale_rewards", "num_iterations",
                   "mask_truncated_completions", "fast_rollouts")},
    rewards=True)


# ---------------------------------------------------------------- eval.py: each reward's mean on held-out prompts

def held_out_prompts(records: list, tokenizer, template, data, budget: int) -> list[dict]:
    """The prompt rows of held-out records, each of up to `budget` tokens: prompts as they are, conversations (and
    pairs) as each user turn with its context (common.prompts)."""
    from common.pairs import Pair
    from common.prompts import Prompt, open_turns

    prompts = [p for r in records for p in (
        [r] if isinstance(r, Prompt) else [Prompt(r.prompt)] if isinstance(r, Pair) else open_turns(r))]
    return encode_prompts(prompts, tokenizer, template, budget, data.system)[0]
