"""What each `train.method` does, behind one interface, so that train.py reads the same for all: read and encode
the recipe's data, show it (--dry-run, --dump-dataset), describe it in the start-up summary, build the TRL trainer.
SFT: conversations -> packed samples -> SFTTrainer (common.dataset, common.report, common.training). DPO and ORPO:
preference pairs -> pair rows -> DPOTrainer / ORPOTrainer (common.pairs, common.preference)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Method:
    build_datasets: Callable  # (recipe, tokenizer) -> train rows, eval rows, stats
    print_dry_run: Callable  # (recipe, tokenizer, train rows, stats)
    dump_dataset: Callable  # (train rows, path)
    summary_lines: Callable  # (recipe, stats) -> the data lines of the start-up summary
    build_trainer: Callable  # (recipe, model, fast_paths, tokenizer, train rows, eval rows, callbacks, dtype, disable_tqdm)


def sft_summary_lines(recipe, stats: dict) -> list[str]:
    d = recipe.data
    apart = ("packed_rows", "packing_efficiency", "sources", "eval_sources")
    lines = ["dataset: " + ", ".join(f"{k}={v}" for k, v in stats.items() if k not in apart),
             (f"packed: {stats['packed_rows']:,} rows of {d.max_length}, packing efficiency "
              f"{100 * stats['packing_efficiency']:.1f}%" if d.pack else f"unpacked: one sample per row of {d.max_length}")]
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


def get(name: str) -> Method:
    from common import report

    if name == "sft":
        from common.dataset import build_datasets
        from common.training import build_trainer

        return Method(build_datasets, report.print_dry_run, report.dump_dataset, sft_summary_lines, build_trainer)
    from common import preference

    return Method(preference.build_pair_datasets, preference.print_dry_run, report.dump_dataset,
                  preference.summary_lines, preference.build_trainer)
