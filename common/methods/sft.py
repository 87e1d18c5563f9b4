"""train.method sft: supervised fine-tuning on conversations (XTuner, Alpaca, ShareGPT, OpenAI layouts;
common/formats.py), encoded by the recipe's template into samples (common/samples.py), packed into rows of
data.max_length, trained by TRL's SFTTrainer with the loss at labelled positions (common/training.py). eval.py's
held-out loss is this method's measure and every method's (common/evaluation.py)."""
from __future__ import annotations

from common import dataset, report
from common.formats import FORMAT_READERS, load_conversations
from common.methods.spec import Method


def summary_lines(recipe, stats: dict) -> list[str]:
    d = recipe.data
    apart = ("packed_rows", "packing_efficiency", "sources", "eval_sources")
    counts = ", ".join(f"{k}={v}" for k, v in stats.items() if k not in apart)
    packing = (f"packed: {stats['packed_rows']:,} rows of {d.max_length}, packing efficiency "
               f"{100 * stats['packing_efficiency']:.1f}%" if d.pack else
               f"unpacked: one sample per row of {d.max_length}")
    lines = ["dataset: " + counts, packing]
    for title, key in (("mixture", "sources"), ("eval mixture", "eval_sources")):
        if stats.get(key):
            lines.append(f"{title} (realised shares of samples / trained tokens): " + ", ".join(
                mixture_share(s, stats[key]) for s in stats[key]))
    return lines


def mixture_share(source: dict, shares: list[dict]) -> str:
    samples = sum(s["samples"] for s in shares) or 1
    tokens = sum(s["trained_tokens"] for s in shares) or 1
    return (f"{source['path']} {100 * source['samples'] / samples:.1f}% / "
            f"{100 * source['trained_tokens'] / tokens:.1f}%")


def build_trainer(*args, **kwargs):
    from common.training import build_trainer

    return build_trainer(*args, **kwargs)


METHOD = Method(
    name="sft", kind="conversations", readers=FORMAT_READERS, load=load_conversations,
    claims=lambda record: False,  # conversations are what a file holds when no other kind claims it
    build_datasets=dataset.build_datasets, print_dry_run=report.print_dry_run, dump_dataset=report.dump_dataset,
    summary_lines=summary_lines, build_trainer=build_trainer, packs=True)
