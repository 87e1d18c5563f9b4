"""Data files -> conversations (lists of `Turn`, common/conversation.py): one reader per format (XTuner, Alpaca,
ShareGPT, OpenAI), JSON lists or JSONL, told apart per file. Broken records (one line: FILE: record N: field X:
problem) are told from merely odd ones (loaded, with a note). To add a format: write a reader `record -> list[Turn]`
and add it to FORMAT_READERS and FORMAT_KEYS.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import UserError
from common.conversation import BadRecord, Turn, messages_to_turns, required_field, text_field


@dataclass
class LoadReport:
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    dropped_empty: int = 0

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def tell(self) -> None:
        """The notes and the skipped-record count, on stderr (the data's report before training starts)."""
        for text in self.notes:
            print(f"note: {text}", file=sys.stderr)
        if self.skipped:
            print(f"skipped {len(self.skipped)} broken record(s); first: {self.skipped[0]}", file=sys.stderr)


# ---------------------------------------------------------------- per-format record readers

def read_xtuner(record: dict) -> list[Turn]:
    turns = []
    for i, turn in enumerate(required_field(record, "conversation", list)):
        where = f"conversation[{i}]"
        if not isinstance(turn, dict):
            raise BadRecord(where, f"expected an object with input/output, got {type(turn).__name__}")
        if "input" not in turn:
            raise BadRecord(f"{where}.input", "missing")
        if "output" not in turn:
            raise BadRecord(f"{where}.output", "missing")
        system = turn.get("system")
        turns.append(Turn(
            input=text_field(turn["input"], f"{where}.input", allow_empty=True, allow_null=True),
            output=text_field(turn["output"], f"{where}.output"),
            system=text_field(system, f"{where}.system", allow_empty=True) if system is not None else None,
        ))
    return turns


def read_alpaca(record: dict) -> list[Turn]:
    instruction = text_field(required_field(record, "instruction", object), "instruction", allow_empty=True)
    extra = record.get("input")
    if extra is not None:
        extra = text_field(extra, "input", allow_empty=True)
    output = text_field(required_field(record, "output", object), "output")
    if output == "<nooutput>":  # Alpaca's marker for unanswerable rows; XTuner drops them too
        return []
    # XTuner's alpaca_map_fn builds f"{instruction}\n{input}" even for input "" (the newline stays). Without an
    # input (missing or null, where XTuner fails or writes "None") the instruction stands alone.
    return [Turn(input=instruction if extra is None else instruction + "\n" + extra, output=output)]


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def read_openai(record: dict) -> list[Turn]:
    return messages_to_turns(required_field(record, "messages", list))


def read_sharegpt(record: dict) -> list[Turn]:
    return messages_to_turns(required_field(record, "conversations", list), "from", "value", SHAREGPT_ROLES,
                             "conversations")


FORMAT_READERS = {"xtuner": read_xtuner, "alpaca": read_alpaca, "sharegpt": read_sharegpt, "openai": read_openai}
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
    # A .jsonl file of one line is one record, whatever it holds (a first preference pair, rated on the web page).
    if isinstance(whole, dict) and (path.suffix == ".jsonl" or detect_format(whole) is not None):
        if path.suffix != ".jsonl":
            report.note(f"{path}: holds a single object, not a list; read it as one record")
        return [("record 0", whole)]
    kind = f"an object with keys {', '.join(list(whole)[:5])}" if isinstance(whole, dict) else type(whole).__name__
    raise UserError(f"{path}: expected a list of records, got {kind}")


def read_file(path: Path, fmt: str, readers: dict, detect, unknown: str, on_bad_record: str, report: LoadReport):
    """Each record of one file through its format's reader (`fmt`, or `detect`ed from the first record it knows;
    `unknown` says why none was). A broken record raises one UserError line, or with on_bad_record "skip" is counted
    in report.skipped. Conversations (load_conversations) and preference pairs (common.pairs) are read here."""
    records = _records(path, report)
    if fmt == "auto":
        fmt = next((f for _, r in records if (f := detect(r))), None)
        if fmt is None:
            raise UserError(f"{path}: {unknown}")
    reader = readers[fmt]
    for label, record in records:
        try:
            if isinstance(record, BadRecord):
                raise record
            if not isinstance(record, dict):
                raise BadRecord("", f"expected an object, got {type(record).__name__}")
            result = reader(record)
        except BadRecord as e:
            message = f"{path}: {label}: {e}"
            if on_bad_record == "error":
                raise UserError(message + " (set data.on_bad_record: skip to skip broken records)") from None
            report.skipped.append(message)
            continue
        yield result


def load_conversations(paths: list[str], fmt: str = "auto", on_bad_record: str = "error",
                       report: LoadReport | None = None) -> list[list[Turn]]:
    """All records of all files, in order. Broken records raise UserError, or are skipped and counted."""
    report = LoadReport() if report is None else report
    unknown = (f"cannot tell the data format (no record has a {', '.join(repr(k) for k in FORMAT_KEYS)} key); "
               "set data.format")
    conversations = []
    for name in paths:
        for turns in read_file(Path(name), fmt, FORMAT_READERS, detect_format, unknown, on_bad_record, report):
            if not turns:
                report.dropped_empty += 1
                continue
            conversations.append(turns)
    if report.dropped_empty:
        report.note(f"dropped {report.dropped_empty} record(s) with no answered turn (empty conversation, "
                    "<nooutput>, or only unanswered user messages), as XTuner does")
    return conversations
