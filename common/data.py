"""Data files -> conversations (lists of Turn) -> training samples {"input_ids", "labels"}.

Readers accept XTuner, Alpaca, ShareGPT and OpenAI files, as JSON lists or JSONL, and tell broken records
(one line: FILE: record N: field X: problem) from merely odd ones (loaded, with a note).
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import UserError
from common.templates import IGNORE, Template, Turn, encode_segments, get_template


class BadRecord(Exception):
    """One broken record; `field` names where in the record, message says what was expected."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field {field}: {message}" if field else message)


@dataclass
class LoadReport:
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    dropped_empty: int = 0

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


# ---------------------------------------------------------------- per-format record readers

def _text(value, where: str, *, allow_empty: bool = False, allow_null: bool = False) -> str:
    if value is None and allow_null:
        return ""
    if not isinstance(value, str):
        raise BadRecord(where, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRecord(where, "empty")
    return value


def _require(record: dict, key: str, kind: type, where: str = ""):
    if key not in record:
        raise BadRecord(where + key, "missing")
    value = record[key]
    if not isinstance(value, kind):
        raise BadRecord(where + key, f"expected a {kind.__name__}, got {type(value).__name__}")
    return value


def read_xtuner(record: dict) -> list[Turn]:
    turns = []
    for i, turn in enumerate(_require(record, "conversation", list)):
        where = f"conversation[{i}]"
        if not isinstance(turn, dict):
            raise BadRecord(where, f"expected an object with input/output, got {type(turn).__name__}")
        if "input" not in turn:
            raise BadRecord(f"{where}.input", "missing")
        if "output" not in turn:
            raise BadRecord(f"{where}.output", "missing")
        system = turn.get("system")
        turns.append(Turn(
            input=_text(turn["input"], f"{where}.input", allow_empty=True, allow_null=True),
            output=_text(turn["output"], f"{where}.output"),
            system=_text(system, f"{where}.system", allow_empty=True) if system is not None else None,
        ))
    return turns


def read_alpaca(record: dict) -> list[Turn]:
    instruction = _text(_require(record, "instruction", object), "instruction", allow_empty=True)
    extra = record.get("input")
    if extra is not None:
        extra = _text(extra, "input", allow_empty=True)
    output = _text(_require(record, "output", object), "output")
    if output == "<nooutput>":  # Alpaca's marker for unanswerable rows; XTuner drops them too
        return []
    # XTuner's alpaca_map_fn builds f"{instruction}\n{input}" even for input "" (the newline stays). Without an
    # input (missing or null, where XTuner fails or writes "None") the instruction stands alone.
    return [Turn(input=instruction if extra is None else instruction + "\n" + extra, output=output)]


def _read_messages(messages: list, role_key: str, content_key: str, roles: dict[str, str], list_key: str) -> list[Turn]:
    """XTuner's openai mapping: skip leading assistant messages, join consecutive user messages, attach a system
    message to the next turn, honour `"loss": false`, drop trailing unanswered user messages."""
    turns, system, user = [], None, ""
    started = False
    for i, message in enumerate(messages):
        where = f"{list_key}[{i}]"
        if not isinstance(message, dict):
            raise BadRecord(where, f"expected an object, got {type(message).__name__}")
        raw_role = _require(message, role_key, str, f"{where}.")
        if raw_role not in roles:
            raise BadRecord(f"{where}.{role_key}", f"unknown role {raw_role!r} (expected one of {', '.join(roles)})")
        role = roles[raw_role]
        content = _text(message.get(content_key), f"{where}.{content_key}", allow_empty=role != "assistant")
        if role == "assistant" and not started:
            continue
        started = True
        if role == "system":
            system = content
        elif role == "user":
            user += content
        else:
            loss = message.get("loss", True)
            turns.append(Turn(input=user, output=content, system=system, train=str(loss).lower() == "true"))
            system, user = None, ""
    return turns


def read_openai(record: dict) -> list[Turn]:
    roles = {"system": "system", "user": "user", "assistant": "assistant"}
    return _read_messages(_require(record, "messages", list), "role", "content", roles, "messages")


def read_sharegpt(record: dict) -> list[Turn]:
    roles = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    return _read_messages(_require(record, "conversations", list), "from", "value", roles, "conversations")


READERS = {"xtuner": read_xtuner, "alpaca": read_alpaca, "sharegpt": read_sharegpt, "openai": read_openai}
FORMAT_KEYS = {"conversation": "xtuner", "messages": "openai", "conversations": "sharegpt", "instruction": "alpaca"}


def detect_format(record) -> str | None:
    if isinstance(record, dict):
        for key, fmt in FORMAT_KEYS.items():
            if key in record:
                return fmt
    return None


# ---------------------------------------------------------------- files

def _decode(data: bytes, path: Path, report: LoadReport) -> str:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
        report.note(f"{path}: starts with a UTF-8 byte-order mark; ignored it")
    text = data.decode("utf-8")  # UnicodeDecodeError is handled by the caller, which knows the record
    if "\r\n" in text:
        report.note(f"{path}: has CRLF line endings; read them as LF")
        text = text.replace("\r\n", "\n")
    return text


def _jsonl_records(data: bytes, path: Path, report: LoadReport) -> list[tuple[str, object]]:
    records = []
    for n, line in enumerate(data.split(b"\n"), start=1):
        try:
            line = (_decode(line, path, report) if n == 1 else line.decode("utf-8")).rstrip("\r")
        except UnicodeDecodeError as e:
            records.append((f"line {n}", BadRecord("", f"not valid UTF-8 (byte {e.start} of the line)")))
            continue
        if line.strip():
            try:
                records.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                records.append((f"line {n}", BadRecord("", f"not valid JSON ({e.msg} at column {e.colno})")))
    if b"\r\n" in data:
        report.note(f"{path}: has CRLF line endings; read them as LF")
    return records


def _records(path: Path, report: LoadReport) -> list[tuple[str, object]]:
    """(label, record) pairs; label is `record N` (JSON list, 0-based) or `line N` (JSONL, 1-based)."""
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    data = path.read_bytes()
    if not data.strip():
        raise UserError(f"{path}: file is empty")
    try:
        text = _decode(data, path, report)
    except UnicodeDecodeError as e:
        if path.suffix == ".jsonl":  # one bad line is one bad record
            return _jsonl_records(data, path, report)
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r})") from None
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as e:
        if path.suffix != ".jsonl" and "Extra data" not in e.msg:
            raise UserError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
        return _jsonl_records(data, path, report)
    if isinstance(whole, list):
        if path.suffix == ".jsonl":
            report.note(f"{path}: .jsonl file holds one JSON array; read it as JSON")
        return [(f"record {i}", r) for i, r in enumerate(whole)]
    if isinstance(whole, dict) and detect_format(whole) is not None:
        if path.suffix != ".jsonl":
            report.note(f"{path}: holds a single object, not a list; read it as one record")
        return [("record 0", whole)]
    kind = f"an object with keys {', '.join(list(whole)[:5])}" if isinstance(whole, dict) else type(whole).__name__
    raise UserError(f"{path}: expected a list of records, got {kind}")


def load_conversations(paths: list[str], fmt: str = "auto", on_bad_record: str = "error",
                       report: LoadReport | None = None) -> list[list[Turn]]:
    """All records of all files, in order. Broken records raise UserError, or are skipped and counted."""
    report = LoadReport() if report is None else report
    conversations = []
    for name in paths:
        path = Path(name)
        records = _records(path, report)
        file_fmt = fmt
        if fmt == "auto":
            file_fmt = next((f for _, r in records if (f := detect_format(r))), None)
            if file_fmt is None:
                raise UserError(f"{path}: cannot tell the data format (no record has a "
                                f"{', '.join(repr(k) for k in FORMAT_KEYS)} key); set data.format")
        reader = READERS[file_fmt]
        for label, record in records:
            try:
                if isinstance(record, BadRecord):
                    raise record
                if not isinstance(record, dict):
                    raise BadRecord("", f"expected an object, got {type(record).__name__}")
                turns = reader(record)
            except BadRecord as e:
                message = f"{path}: {label}: {e}"
                if on_bad_record == "error":
                    raise UserError(message + " (set data.on_bad_record: skip to skip broken records)") from None
                report.skipped.append(message)
                continue
            if not turns:
                report.dropped_empty += 1
                continue
            conversations.append(turns)
    if report.dropped_empty:
        report.note(f"dropped {report.dropped_empty} record(s) with no answered turn (empty conversation, "
                    "<nooutput>, or only unanswered user messages), as XTuner does")
    return conversations


# ---------------------------------------------------------------- samples: the three truncation modes

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


def make_samples(tokenizer, template, turns: list[Turn], max_length: int, mode: str, stats: Stats):
    """One conversation -> its training samples, following data.truncation (cut | turns | split)."""
    segments = encode_segments(tokenizer, template, turns)
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
    else:  # split: consecutive windows of whole turns, the system prompt re-attached to each
        system, start = turns[0].system, 0
        while start < len(turns):
            end, best = start, None
            while end < len(turns):
                candidate = _concat(encode_segments(tokenizer, template, _window(turns, start, end + 1, system)))
                if len(candidate[0]) > max_length:
                    break
                best, end = candidate, end + 1
            if best is None:  # one turn alone is too long: shorten it as `turns` does
                ids, labels = _concat(encode_segments(tokenizer, template, _window(turns, start, start + 1, system)))
                ids, labels, lost = _shorten(ids, labels, max_length, bos_id)
                stats.lost_to_shortening += lost
                stats.truncated += 1
                best, end = (ids, labels), start + 1
            samples.append(best)
            start = end
    samples = [(ids, labels) for ids, labels in samples if _trained(labels)]
    if not samples:
        stats.dropped += 1
    for ids, labels in samples:
        stats.samples += 1
        stats.tokens += len(ids)
        stats.trained_tokens += _trained(labels)
    return samples


def encode_conversations(conversations, tokenizer, template_name: str, max_length: int, mode: str,
                         default_system: str | None = None, stats: Stats | None = None) -> tuple[list[dict], Stats]:
    template = get_template(template_name)
    stats = Stats() if stats is None else stats
    rows = []
    for turns in conversations:
        if default_system and not turns[0].system:
            turns = [Turn(turns[0].input, turns[0].output, default_system, turns[0].train)] + turns[1:]
        stats.records += 1
        stats.turns += len(turns)
        for ids, labels in make_samples(tokenizer, template, turns, max_length, mode, stats):
            rows.append({"input_ids": ids, "labels": labels})
    return rows, stats


def pack_rows(rows: list[dict], max_length: int, shuffle: bool, seed: int):
    """Whole samples packed best-fit-decreasing into rows of max_length (TRL's `bfd`), never cut: a cut sample
    would train its continuation without its prompt. `seq_lengths` lists each row's samples, so the padding-free
    collator restarts position ids per sample and attention stays inside each."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    order = list(range(len(rows)))
    if shuffle:  # decides which of equally long samples share a row
        random.Random(seed).shuffle(order)
    data = Dataset.from_dict({"input_ids": [rows[i]["input_ids"] for i in order],
                              "labels": [rows[i]["labels"] for i in order]})
    return pack_dataset(data, max_length, strategy="bfd")


def packing_stats(rows: list[dict], max_length: int) -> tuple[int, float]:
    """Rows and efficiency (real tokens / slots) of the packing training does."""
    if not rows:
        return 0, 0.0
    packed = pack_rows(rows, max_length, shuffle=False, seed=0)
    return len(packed), sum(len(r["input_ids"]) for r in rows) / (len(packed) * max_length)


def _encode_recipe_data(recipe, tokenizer, report: LoadReport) -> tuple[list[dict], list[dict], Stats]:
    d = recipe.data
    conversations = load_conversations(d.paths, d.format, d.on_bad_record, report)
    eval_conversations = load_conversations(d.eval_paths, d.format, d.on_bad_record, report) if d.eval_paths else []
    if d.eval_fraction and not eval_conversations:
        order = list(range(len(conversations)))
        random.Random(recipe.train.seed).shuffle(order)
        held = set(order[: max(1, round(len(conversations) * d.eval_fraction))])
        eval_conversations = [c for i, c in enumerate(conversations) if i in held]
        conversations = [c for i, c in enumerate(conversations) if i not in held]
    template = get_template(d.template)
    if isinstance(template, Template):
        bos = tokenizer.bos_token
        if bos and tokenizer.bos_token_id is not None and template.prompt("", 1, "x").startswith(bos):
            report.note(f"the tokenizer's BOS token {bos} also starts template `{template.name}`, and XTuner's encoding "
                        f"prepends BOS: samples start with it twice (use `template: tokenizer` for this model)")
        if template.system is None and any(t.system for c in conversations for t in c):
            report.note(f"template `{template.name}` has no system format: system prompts in the data are ignored")
    args = (tokenizer, d.template, d.max_length, d.truncation, d.system)
    train_rows, stats = encode_conversations(conversations, *args)
    stats.skipped = len(report.skipped)
    eval_rows = encode_conversations(eval_conversations, *args)[0] if eval_conversations else []
    if train_rows and d.pack:
        stats.packed_rows, stats.packing_efficiency = packing_stats(train_rows, d.max_length)
    return train_rows, eval_rows, stats


# Bump when the encoding's output changes in a way the source hash below cannot see.
CACHE_VERSION = "1"


def _cache_key(recipe, tokenizer) -> str:
    """Everything the encoded rows depend on: data files, data settings, tokenizer, and this code."""
    import dataclasses
    import hashlib

    h = hashlib.sha256(CACHE_VERSION.encode())
    here = Path(__file__).parent
    for source in ("data.py", "templates.py", "prompt_templates.json"):
        h.update((here / source).read_bytes())
    h.update(json.dumps([dataclasses.asdict(recipe.data), recipe.train.seed], sort_keys=True).encode())
    for name in recipe.data.paths + recipe.data.eval_paths:
        h.update(name.encode() + Path(name).read_bytes() if Path(name).is_file() else name.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    h.update(json.dumps([type(tokenizer).__name__, vocab, tokenizer.chat_template, tokenizer.bos_token,
                         tokenizer.eos_token, tokenizer.bos_token_id, tokenizer.eos_token_id]).encode())
    return h.hexdigest()[:32]


def cache_dir() -> Path:
    from datasets import config

    return Path(config.HF_DATASETS_CACHE) / "sft_rows"


def build_datasets(recipe, tokenizer, report: LoadReport | None = None, use_cache: bool = True):
    """Train and eval rows (unpacked, in input order) and the stats that --dry-run prints.

    Encoded rows are cached (Arrow, through `datasets`) under a key of everything they depend on, so a re-run
    of the same recipe on the same data and tokenizer skips reading and tokenizing."""
    from datasets import Dataset, load_from_disk

    report = LoadReport() if report is None else report
    where = cache_dir() / _cache_key(recipe, tokenizer) if use_cache else None
    if where is not None and (where / "meta.json").is_file():
        meta = json.loads((where / "meta.json").read_text(encoding="utf-8"))
        report.notes[:], report.skipped[:] = meta["notes"], meta["skipped"]
        train_rows = load_from_disk(str(where / "train")).to_list()
        eval_rows = load_from_disk(str(where / "eval")).to_list() if (where / "eval").exists() else []
        stats = Stats(**meta["stats"])
    else:
        train_rows, eval_rows, stats = _encode_recipe_data(recipe, tokenizer, report)
        if where is not None and train_rows:
            import os
            import shutil
            import tempfile

            where.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=where.parent, prefix=".tmp-"))
            Dataset.from_list(train_rows).save_to_disk(str(tmp / "train"))
            if eval_rows:
                Dataset.from_list(eval_rows).save_to_disk(str(tmp / "eval"))
            meta = {"notes": report.notes, "skipped": report.skipped, "stats": vars(stats)}
            (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
            try:
                os.rename(tmp, where)
            except OSError:  # another process (a DDP rank) cached it first
                shutil.rmtree(tmp, ignore_errors=True)
    for text in report.notes:
        print(f"note: {text}", file=sys.stderr)
    if report.skipped:
        print(f"skipped {len(report.skipped)} broken record(s); first: {report.skipped[0]}", file=sys.stderr)
    if not train_rows:
        d = recipe.data
        raise UserError(f"{', '.join(d.paths)}: no training sample left (records: {stats.records}, dropped: {stats.dropped})")
    return train_rows, eval_rows, vars(stats)


# ---------------------------------------------------------------- --dry-run and --dump-dataset

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
    if pack:
        lines += [("packed rows", stats["packed_rows"]), ("packing efficiency", f"{100 * stats['packing_efficiency']:.1f}%")]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in lines)


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


def compare_truncation(recipe, tokenizer) -> str:
    """The three truncation modes side by side on the recipe's data: what each trains and loses."""
    d = recipe.data
    conversations = load_conversations(d.paths, d.format, "skip")
    lines = [f"  {'mode':<6}  {'answer tokens trained':>22}  {'dropped':>7}  {'samples':>7}  {'lost to shortening':>18}"]
    for mode in ("cut", "turns", "split"):
        _, st = encode_conversations(conversations, tokenizer, d.template, d.max_length, mode, d.system)
        share = f"{100 * st.trained_tokens / max(st.answer_tokens, 1):.1f}%"
        mark = " <- recipe" if mode == d.truncation else ""
        lines.append(f"  {mode:<6}  {share:>22}  {st.dropped:>7}  {st.samples:>7}  {st.lost_to_shortening:>18}{mark}")
    return "\n".join(lines)


def print_dry_run(recipe, tokenizer, train_rows: list[dict], stats: dict) -> None:
    d = recipe.data
    print(f"recipe {recipe.source}: template {d.template}, max_length {d.max_length}, truncation {d.truncation}, "
          f"pack {d.pack}")
    print(format_stats(stats, d.pack))
    print(f"\ntruncation modes at max_length {d.max_length}:")
    print(compare_truncation(recipe, tokenizer))
    print("\nfirst sample (trained spans marked):")
    print(preview(tokenizer, train_rows[0], sys.stdout.isatty()))


def dump_dataset(rows: list[dict], path: str | Path) -> None:
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"input_ids": row["input_ids"], "labels": row["labels"]}) + "\n")
    os.replace(tmp, path)
    print(f"wrote {len(rows)} samples to {path}")
