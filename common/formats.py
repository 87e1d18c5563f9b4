"""Data files -> conversations (lists of `Turn`, common/conversation.py): one reader per format (XTuner, Alpaca,
ShareGPT, OpenAI), JSON lists or JSONL, told apart per file. Broken records (one line: FILE: record N: field X:
problem) are told from merely odd ones (loaded, with a note). To add a format: write a reader `record -> list[Turn]`
and add it to FORMAT_READERS and FORMAT_KEYS.
"""
from __future__ import annotations

import codecs
import io
import itertools
import json
import sys
from collections.abc import Iterator
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


def _jsonl_records(lines, path: Path, report: LoadReport) -> Iterator[tuple[str, object]]:
    """(label, record) of each non-blank line of `lines` (bytes, with or without their newline)."""
    crlf = False
    for n, line in enumerate(lines, start=1):
        crlf = crlf or line.endswith(b"\r\n")
        line = line.rstrip(b"\n")
        try:
            line = (_decode(line, path, report) if n == 1 else line.decode("utf-8")).rstrip("\r")
        except UnicodeDecodeError as e:
            yield f"line {n}", BadRecord("", f"not valid UTF-8 (byte {e.start} of the line)")
            continue
        if line.strip():
            try:
                yield f"line {n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {n}", BadRecord("", f"not valid JSON ({e.msg} at column {e.colno})")
    if crlf:
        report.note(f"{path}: has CRLF line endings; read them as LF")


# Files up to this size are read whole (every oddity told apart as below); larger ones are streamed record by record:
# a JSON array through an incremental decoder, anything else as JSONL, line by line, in bounded memory. No record
# may be larger.
STREAM_ABOVE = 64 << 20
CHUNK = 1 << 20


def _array_records(path: Path, report: LoadReport, chunk: int = CHUNK) -> Iterator[tuple[str, object]]:
    """The records of a file holding one JSON array, decoded one at a time from a buffer of about `chunk`
    characters (plus the record being read): memory is bounded by the largest record, not the file."""
    decoder = json.JSONDecoder()
    with open(path, "rb") as f:
        reader = codecs.getincrementaldecoder("utf-8")()
        buffer, pos, lines_before, eof, i, started = "", 0, 0, False, 0, False

        def more() -> bool:
            nonlocal buffer, pos, lines_before, eof
            data = f.read(chunk)
            try:
                text = reader.decode(data, final=not data)
            except UnicodeDecodeError as e:
                byte = f.tell() - len(data) + e.start
                raise UserError(f"{path}: record {i}: not valid UTF-8 (byte {byte})") from None
            if not started and text.startswith("\ufeff"):
                text = text[1:]
                report.note(f"{path}: starts with a UTF-8 byte-order mark; ignored it")
            if "\r\n" in text or (buffer.endswith("\r") and text.startswith("\n")):
                report.note(f"{path}: has CRLF line endings; read them as LF")
            lines_before += buffer.count("\n", 0, pos)
            buffer, pos, eof = buffer[pos:] + text, 0, not data
            return bool(data)

        def skip_space() -> str:
            nonlocal pos
            while True:
                while pos < len(buffer) and buffer[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buffer) or not more():
                    return buffer[pos:pos + 1]

        def fail(message: str, at: int):
            line = lines_before + buffer.count("\n", 0, at) + 1
            raise UserError(f"{path}: line {line}: not valid JSON ({message})")

        skip_space()
        started = True
        pos += 1  # the opening [ (the caller saw it)
        if skip_space() == "]":
            pos += 1
        else:
            while True:
                while True:
                    try:
                        record, end = decoder.raw_decode(buffer, pos)
                        if end < len(buffer) or eof:  # a number at the buffer's end may go on in the next chunk
                            break
                    except json.JSONDecodeError as e:
                        # more text cannot mend it at the end of the file, nor a "record" that long (a broken one
                        # near the start of a huge file must not read the rest into memory)
                        if eof or len(buffer) - pos > STREAM_ABOVE:
                            fail(e.msg, e.pos)
                    more()
                yield f"record {i}", record
                i += 1
                pos = end
                token = skip_space()
                if token == ",":
                    pos += 1
                    skip_space()
                    continue
                if token == "]":
                    pos += 1
                    break
                fail("Expecting ',' delimiter" if token else "Expecting value", pos)
        if skip_space():
            fail("Extra data", pos)


def _first_byte(path: Path) -> bytes:
    """The first byte of the file that is not a byte-order mark or whitespace (b"" for an empty file)."""
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            block = block.removeprefix(b"\xef\xbb\xbf") if f.tell() == len(block) else block
            if stripped := block.lstrip():
                return stripped[:1]
    return b""


def _records(path: Path, report: LoadReport, stream_above: int = STREAM_ABOVE) -> Iterator[tuple[str, object]]:
    """(label, record) pairs; label is `record N` (JSON list, 0-based) or `line N` (JSONL, 1-based)."""
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    if path.stat().st_size > stream_above:
        first = _first_byte(path)
        if not first:
            raise UserError(f"{path}: file is empty")
        if first == b"[":
            return _array_records(path, report)
        return _jsonl_file(path, report)
    return iter(_whole_records(path, report))


def _jsonl_file(path: Path, report: LoadReport) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as f:
        yield from _jsonl_records(f, path, report)


def _whole_records(path: Path, report: LoadReport) -> list[tuple[str, object]]:
    data = path.read_bytes()
    if not data.strip():
        raise UserError(f"{path}: file is empty")
    try:
        text = _decode(data, path, report)
    except UnicodeDecodeError as e:
        if path.suffix == ".jsonl":  # one bad line is one bad record
            return list(_jsonl_records(io.BytesIO(data), path, report))
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r})") from None
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as e:
        if path.suffix != ".jsonl" and "Extra data" not in e.msg:
            raise UserError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
        return list(_jsonl_records(io.BytesIO(data), path, report))
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
    if fmt == "auto":  # from the first record that tells; the records read to find it are read again from here
        seen = []
        for label, record in records:
            seen.append((label, record))
            if fmt := detect(record):
                break
        else:
            raise UserError(f"{path}: {unknown}")
        records = itertools.chain(seen, records)
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
    return [turns for _, turns in stream_conversations([(name, fmt) for name in paths], on_bad_record, report)]


def stream_conversations(files: list[tuple[str, str]], on_bad_record: str = "error",
                         report: LoadReport | None = None) -> Iterator[tuple[int, list[Turn]]]:
    """(index of the file in `files`, conversation) one at a time, each file (path, format) read in its own format;
    a file larger than STREAM_ABOVE is never held whole."""
    report = LoadReport() if report is None else report
    unknown = (f"cannot tell the data format (no record has a {', '.join(repr(k) for k in FORMAT_KEYS)} key); "
               "set data.format")
    for k, (name, fmt) in enumerate(files):
        for turns in read_file(Path(name), fmt, FORMAT_READERS, detect_format, unknown, on_bad_record, report):
            if not turns:
                report.dropped_empty += 1
                continue
            yield k, turns
    if report.dropped_empty:
        report.note(f"dropped {report.dropped_empty} record(s) with no answered turn (empty conversation, "
                    "<nooutput>, or only unanswered user messages), as XTuner does")
