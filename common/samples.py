"""Conversations -> training samples {"input_ids", "labels"}: the template's encoding, the three truncation modes
(data.truncation: cut | turns | split), and best-fit packing of whole samples into rows. Training, --dry-run,
evaluation and the bench all make their samples here.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from common.templates import IGNORE, Segment, Template, Turn


@dataclass
class Stats:
    records: int = 0
    turns: int = 0
    samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    answer_tokens: int = 0  # trained tokens the full conversations hold, before any truncation
    lost_to_shortening: int = 0  # answer tokens cut out of turns that were shortened to fit
    truncated: int = 0  # samples that were cut or shortened
    dropped: int = 0  # records that yield no sample with a trained token
    skipped: int = 0  # broken records skipped (on_bad_record: skip)
    packed_rows: int = 0
    packing_efficiency: float = 0.0


def _trained(labels: list[int]) -> int:
    return sum(label != IGNORE for label in labels)


def _concat(segments) -> tuple[list[int], list[int]]:
    return [i for s in segments for i in s[0]], [lab for s in segments for lab in s[1]]


def _shorten(ids, labels, max_length: int, bos_id) -> tuple[list[int], list[int], int]:
    """Fit one turn: cut its prompt from the left (keeping BOS), then its answer from the right.
    Returns ids, labels and the number of trained tokens lost."""
    over = len(ids) - max_length
    if over <= 0:
        return ids, labels, 0
    head = 1 if bos_id is not None and ids and ids[0] == bos_id else 0
    prompt_end = next((n for n, lab in enumerate(labels) if lab != IGNORE), len(ids))
    cut = min(over, max(prompt_end - head, 0))
    ids, labels = ids[:head] + ids[head + cut:], labels[:head] + labels[head + cut:]
    before = _trained(labels)
    ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels, before - _trained(labels)


def _window(turns: list[Turn], start: int, end: int, system) -> list[Turn]:
    window = list(turns[start:end])
    if start > 0 and system and not window[0].system:
        window[0] = Turn(window[0].input, window[0].output, system, window[0].train)
    return window


def _split(tokenizer, template: Template, turns: list[Turn], segments: list[Segment], max_length: int,
           stats: Stats) -> list[tuple[list[int], list[int]]]:
    """Consecutive windows of whole turns, each as long as fits, with the conversation's system prompt re-attached
    to each (and {round} restarting). A template encodes each turn given only the turns before it, so a window is the
    leading segments of the encoding of the turns from its start: one encoding per window, not per candidate."""
    system, start, samples = turns[0].system, 0, []
    while start < len(turns):
        rest = segments if start == 0 else template.encode(tokenizer, _window(turns, start, len(turns), system))
        end, total = 0, 0
        while end < len(rest) and total + len(rest[end][0]) <= max_length:
            total += len(rest[end][0])
            end += 1
        if end == 0:  # one turn alone is too long: shorten it as `turns` does
            ids, labels, lost = _shorten(*rest[0], max_length, tokenizer.bos_token_id)
            stats.lost_to_shortening += lost
            stats.truncated += 1
            samples.append((ids, labels))
            end = 1
        else:
            samples.append(_concat(rest[:end]))
        start += end
    return samples


def make_samples(tokenizer, template: Template, turns: list[Turn], max_length: int, mode: str, stats: Stats):
    """One conversation -> its training samples, following data.truncation (cut | turns | split)."""
    segments = template.encode(tokenizer, turns)
    full_ids, full_labels = _concat(segments)
    stats.answer_tokens += _trained(full_labels)
    bos_id = tokenizer.bos_token_id
    samples = []
    if len(full_ids) <= max_length:
        samples = [(full_ids, full_labels)]
    elif mode == "cut":  # XTuner: keep the first max_length tokens
        samples = [(full_ids[:max_length], full_labels[:max_length])]
        stats.truncated += 1
    elif mode == "turns":
        total, keep = 0, 0
        while keep < len(segments) and total + len(segments[keep][0]) <= max_length:
            total += len(segments[keep][0])
            keep += 1
        if keep:
            samples = [_concat(segments[:keep])]
        else:
            ids, labels, lost = _shorten(*segments[0], max_length, bos_id)
            stats.lost_to_shortening += lost
            samples = [(ids, labels)]
        stats.truncated += 1
    else:
        samples = _split(tokenizer, template, turns, segments, max_length, stats)
    samples = [(ids, labels) for ids, labels in samples if _trained(labels)]
    if not samples:
        stats.dropped += 1
    for ids, labels in samples:
        stats.samples += 1
        stats.tokens += len(ids)
        stats.trained_tokens += _trained(labels)
    return samples


def with_system(turns: list[Turn], default_system: str | None) -> list[Turn]:
    """The conversation with `default_system` on its first turn when it has no system prompt (data.system)."""
    if default_system and not turns[0].system:
        return [Turn(turns[0].input, turns[0].output, default_system, turns[0].train)] + turns[1:]
    return turns


def encode_conversations(conversations, tokenizer, template: Template, max_length: int, mode: str,
                         default_system: str | None = None, stats: Stats | None = None) -> tuple[list[dict], Stats]:
    stats = Stats() if stats is None else stats
    rows = []
    for turns in conversations:
        turns = with_system(turns, default_system)
        stats.records += 1
        stats.turns += len(turns)
        for ids, labels in make_samples(tokenizer, template, turns, max_length, mode, stats):
            rows.append({"input_ids": ids, "labels": labels})
    return rows, stats


def pack_rows(rows: list[dict], max_length: int, shuffle: bool, seed: int):
    """Whole samples packed best-fit-decreasing into rows of max_length (TRL's `bfd`), never cut: a cut sample
    would train its continuation without its prompt. `seq_lengths` lists each row's samples, so the padding-free
    collator restarts position ids per sample and attention stays inside each. Every column of the rows, one value
    per token, is packed alike (evaluation's `owners` beside input_ids and labels)."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    order = list(range(len(rows)))
    if shuffle:  # decides which of equally long samples share a row
        random.Random(seed).shuffle(order)
    data = Dataset.from_dict({key: [rows[i][key] for i in order] for key in rows[0]})
    return pack_dataset(data, max_length, strategy="bfd")


def packing_stats(rows: list[dict], max_length: int) -> tuple[int, float]:
    """Rows and efficiency (real tokens / slots) of the packing training does."""
    if not rows:
        return 0, 0.0
    packed = pack_rows(rows, max_length, shuffle=False, seed=0)
    return len(packed), sum(len(r["input_ids"]) for r in rows) / (len(packed) * max_length)
