"""Conversations -> training samples {"input_ids", "labels"}: the template's encoding, the truncation modes
(data.truncation: cut | turns | split, the keys of TRUNCATION), and best-fit packing of whole samples into rows.
Training, --dry-run, evaluation and the bench all make their samples here. To add a truncation mode: write a function
with `_cut`'s signature and add it to TRUNCATION; the recipe accepts its name from then on.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from common.conversation import Turn, window, with_system
from common.templates import IGNORE, Segment, Template, conversation_for, preencoded


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
    rewritten_samples: int = 0  # samples of one turn as inference sees it (a template that rewrites history)
    rewritten_history_tokens: int = 0  # their re-encoded history: what training pays beyond one sample a conversation
    sources: list = field(default_factory=list)  # a mixture's realised shares (common.dataset): one dict per source
    eval_sources: list = field(default_factory=list)


def _trained(labels: list[int]) -> int:
    return len(labels) - labels.count(IGNORE)


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


def _fitting(segments: list[Segment], max_length: int) -> int:
    """How many leading segments (whole turns) fit in max_length together."""
    total, n = 0, 0
    while n < len(segments) and total + len(segments[n][0]) <= max_length:
        total += len(segments[n][0])
        n += 1
    return n


def _cut(tokenizer, template: Template, turns: list[Turn], segments: list[Segment], max_length: int,
         stats: Stats) -> list[tuple[list[int], list[int]]]:
    """XTuner's way: the first max_length tokens, wherever they end."""
    ids, labels = _concat(segments)
    stats.truncated += 1
    return [(ids[:max_length], labels[:max_length])]


def _turns(tokenizer, template: Template, turns: list[Turn], segments: list[Segment], max_length: int,
           stats: Stats) -> list[tuple[list[int], list[int]]]:
    """The leading whole turns that fit; a first turn too long alone is shortened to fit."""
    keep = _fitting(segments, max_length)
    stats.truncated += 1
    if keep:
        return [_concat(segments[:keep])]
    ids, labels, lost = _shorten(*segments[0], max_length, tokenizer.bos_token_id)
    stats.lost_to_shortening += lost
    return [(ids, labels)]


def _split(tokenizer, template: Template, turns: list[Turn], segments: list[Segment], max_length: int,
           stats: Stats) -> list[tuple[list[int], list[int]]]:
    """Consecutive windows of whole turns, each as long as fits, with the conversation's system prompt re-attached
    to each (and {round} restarting). A template encodes each turn given only the turns before it, so a window is the
    leading segments of the encoding of the turns from its start: one encoding per window, not per candidate."""
    start, samples = 0, []
    while start < len(turns):
        rest = segments if start == 0 else template.encode(tokenizer, window(turns, start))
        end = _fitting(rest, max_length)
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


# data.truncation: what a conversation longer than max_length becomes. The recipe's choices are these keys.
TRUNCATION = {"cut": _cut, "turns": _turns, "split": _split}
TRUNCATION_MODES = tuple(TRUNCATION)


def _fit_turn_as_seen(tokenizer, template: Template, turns: list[Turn], segments: list[Segment], max_length: int,
                      stats: Stats) -> list[tuple[list[int], list[int]]]:
    """A sample of one turn as inference sees it (its history re-encoded), too long: earlier turns leave from the
    left (the system prompt kept, as windows keep it), then a last turn too long alone is shortened. Whatever
    data.truncation says: only the last answer is trained, so cutting from the right would train nothing."""
    start = 0
    while sum(len(s[0]) for s in segments) > max_length and start < len(turns) - 1:
        start += 1
        segments = template.encode_as_seen(tokenizer, window(turns, start))
    ids, labels = _concat(segments)
    stats.truncated += 1
    ids, labels, lost = _shorten(ids, labels, max_length, tokenizer.bos_token_id)
    stats.lost_to_shortening += lost
    return [(ids, labels)]


def make_samples(tokenizer, template: Template, turns: list[Turn], max_length: int, mode: str, stats: Stats):
    """One conversation -> its training samples, following data.truncation (one of TRUNCATION_MODES). A template
    that rewrites history gives one sample per trained turn (`Template.views`), each as inference sees it."""
    views = template.views(tokenizer, turns)
    samples = []
    for n, view in enumerate(views):
        full_ids, full_labels = _concat(view.segments)
        stats.answer_tokens += _trained(full_labels)
        if view.rewritten:
            stats.rewritten_samples += 1
            if n < len(views) - 1:  # the last view holds the whole conversation: the others are the extra cost
                stats.rewritten_history_tokens += len(view.segments[0][0])
        if len(full_ids) <= max_length:
            samples.append((full_ids, full_labels))
        else:
            fit = _fit_turn_as_seen if view.rewritten else TRUNCATION[mode]
            samples += fit(tokenizer, template, view.turns, view.segments, max_length, stats)
    samples = [(ids, labels) for ids, labels in samples if _trained(labels)]
    if not samples:
        stats.dropped += 1
    for ids, labels in samples:
        stats.samples += 1
        stats.tokens += len(ids)
        stats.trained_tokens += _trained(labels)
    return samples


def encode_conversations(conversations, tokenizer, template: Template, max_length: int, mode: str,
                         default_system: str | None = None, stats: Stats | None = None,
                         thinking: str = "keep") -> tuple[list[dict], Stats]:
    """Each conversation's samples, in order. The template's text pieces of all of them (`Template.pieces`: a table
    template's; a Jinja template renders each conversation itself) are tokenized in one batched call first (pass
    batches of a few hundred conversations: common.dataset does)."""
    stats = Stats() if stats is None else stats
    rows = []
    conversations = [conversation_for(with_system(turns, default_system), thinking) for turns in conversations]
    with preencoded(tokenizer, [text for turns in conversations for text in template.pieces(turns)]):
        for turns in conversations:
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
    from trl.data_utils import pack_dataset

    data = as_dataset(rows)
    if shuffle:  # decides which of equally long samples share a row
        order = list(range(len(data)))
        random.Random(seed).shuffle(order)
        data = data.select(order)
    return pack_dataset(data, max_length, strategy="bfd")


def as_dataset(rows):
    """Rows as a `datasets.Dataset`: encoded data already is one (Arrow, on disk); a list of dicts becomes one."""
    from datasets import Dataset

    if isinstance(rows, Dataset):
        return rows
    return Dataset.from_dict({key: [row[key] for row in rows] for key in rows[0]})


def packing_efficiency(packed, max_length: int) -> tuple[int, int, float]:
    """(real tokens, rows, real tokens / slots) of rows packed by pack_rows."""
    real = sum(sum(lengths) for lengths in packed["seq_lengths"])
    return real, len(packed), real / max(len(packed) * max_length, 1)


def packing_stats(rows: list[dict], max_length: int, shuffle: bool, seed: int) -> tuple[int, float]:
    """Rows and efficiency of the packing training does (the same shuffle and seed: the same rows)."""
    if not rows:
        return 0, 0.0
    _, packed_rows, efficiency = packing_efficiency(pack_rows(rows, max_length, shuffle, seed), max_length)
    return packed_rows, efficiency
