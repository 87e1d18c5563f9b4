"""What `train.py --dry-run` prints (statistics, the truncation modes side by side, the first sample with its
trained spans marked) and what `--dump-dataset` writes."""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

from common.dataset import ENCODE_BATCH, source_rules
from common.formats import stream_conversations
from common.samples import TRUNCATION_MODES, Stats, encode_conversations
from common.templates import IGNORE, get_template


def format_stats(stats: dict, pack: bool) -> str:
    answer = stats["answer_tokens"] or 1
    lines = [
        ("records", stats["records"]), ("turns", stats["turns"]), ("samples", stats["samples"]),
        ("tokens", stats["tokens"]), ("trained tokens", stats["trained_tokens"]),
        ("answer tokens trained", f"{stats['trained_tokens']} / {stats['answer_tokens']} "
                                  f"({100 * stats['trained_tokens'] / answer:.1f}%)"),
        ("answer tokens lost to shortening", stats["lost_to_shortening"]),
        ("truncated", stats["truncated"]), ("dropped", stats["dropped"]), ("skipped", stats["skipped"]),
    ]
    if stats.get("rewritten_samples"):  # the template rewrites history: each trained turn re-encodes what came before
        share = 100 * stats["rewritten_history_tokens"] / max(stats["tokens"], 1)
        lines += [("turns as inference sees them", f"{stats['rewritten_samples']} samples (the template rewrites "
                   f"history); re-encoded history +{stats['rewritten_history_tokens']} tokens ({share:.1f}% of all)")]
    if pack:
        lines += [("packed rows", stats["packed_rows"]), ("packing efficiency", f"{100 * stats['packing_efficiency']:.1f}%")]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in lines)


def format_shares(shares: list[dict]) -> str:
    """A mixture's realised shares: each source's conversations, samples and trained tokens, and its share of each."""
    totals = {k: sum(s[k] for s in shares) or 1 for k in ("conversations", "samples", "trained_tokens")}
    width = max(len(s["path"]) for s in shares)
    lines = [f"  {'source':<{width}}  {'conversations':>16}  {'samples':>16}  {'trained tokens':>22}"]
    for s in shares:
        cells = [f"{s[k]:,} ({100 * s[k] / totals[k]:.1f}%)" for k in totals]
        lines.append(f"  {s['path']:<{width}}  {cells[0]:>16}  {cells[1]:>16}  {cells[2]:>22}")
    return "\n".join(lines)


def preview(tokenizer, row: dict, color: bool) -> str:
    """The sample as text with its trained spans marked: green on a terminal, [[...]] otherwise."""
    start, end = ("\033[32m", "\033[0m") if color else ("[[", "]]")
    out, span, trained = [], [], False
    for token, label in zip(row["input_ids"], row["labels"]):
        if (label != IGNORE) != trained and span:
            text = tokenizer.decode(span)
            out.append(f"{start}{text}{end}" if trained else text)
            span = []
        trained = label != IGNORE
        span.append(token)
    if span:
        text = tokenizer.decode(span)
        out.append(f"{start}{text}{end}" if trained else text)
    return "".join(out)


# The truncation modes are compared on at most this many conversations (the first ones): a comparison, not a count.
COMPARED = 5000


def compare_truncation(recipe, tokenizer) -> str:
    """The truncation modes side by side on the recipe's data (its first COMPARED conversations): what each trains
    and loses."""
    d = recipe.data
    files = [(s.path, s.format or d.format) for s in d.sources]
    read = list(itertools.islice(stream_conversations(files, "skip"), COMPARED + 1))
    title = ""
    if len(read) > COMPARED:
        read, title = read[:COMPARED], f" (the first {COMPARED:,} conversations)"
    # each source with its own template and system prompt (as training encodes it); the mode is what is compared
    rules = source_rules(d, d.sources)
    by_source = [(rules[k], [turns for _, turns in group]) for k, group in itertools.groupby(read, key=lambda x: x[0])]
    lines = [f"  {'mode':<6}  {'answer tokens trained':>22}  {'dropped':>7}  {'samples':>7}  {'lost to shortening':>18}"
             + title]
    for mode in TRUNCATION_MODES:
        st = Stats()
        for (name, system, _, thinking), conversations in by_source:
            template = get_template(name, thinking)
            for start in range(0, len(conversations), ENCODE_BATCH):
                encode_conversations(conversations[start:start + ENCODE_BATCH], tokenizer, template, d.max_length,
                                     mode, system, st, thinking)
        share = f"{100 * st.trained_tokens / max(st.answer_tokens, 1):.1f}%"
        mark = " <- recipe" if mode == d.truncation else ""
        lines.append(f"  {mode:<6}  {share:>22}  {st.dropped:>7}  {st.samples:>7}  {st.lost_to_shortening:>18}{mark}")
    return "\n".join(lines)


def print_dry_run(recipe, tokenizer, train_rows: list[dict], stats: dict) -> None:
    d = recipe.data
    print(f"recipe {recipe.source}: template {d.template}, max_length {d.max_length}, truncation {d.truncation}, "
          f"pack {d.pack}")
    print(format_stats(stats, d.pack))
    for title, shares in (("mixture", stats.get("sources")), ("eval mixture", stats.get("eval_sources"))):
        if shares:
            print(f"\n{title} (realised shares):")
            print(format_shares(shares))
    print(f"\ntruncation modes at max_length {d.max_length}:")
    print(compare_truncation(recipe, tokenizer))
    print("\nfirst sample (trained spans marked):")
    print(preview(tokenizer, train_rows[0], sys.stdout.isatty()))


def dump_dataset(rows: list[dict], path: str | Path) -> None:
    from common.artifacts import atomic_file

    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")  # input_ids + labels (SFT), prompt_ids + chosen_ids + rejected_ids (pairs)
    print(f"wrote {len(rows)} samples to {path}")
