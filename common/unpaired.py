"""Rated answers (unpaired preference data, train.method kto): a prompt of turns, one answer, and whether it was good
(`label` true: desirable) or bad. Data files -> `Rated` -> the token rows TRL's KTOTrainer takes (`prompt_ids`,
`completion_ids`, `label`).

Three formats, told apart per file as the pair formats are (common/pairs.py, whose readers and fitting these share):
`conversational` (TRL's: `prompt` a list of messages, `completion` the assistant's message, alone or as a one-message
list, `label` true/false), `plain` (TRL's strings: the prompt is one user turn) and `sharegpt` (LLaMA-Factory's KTO
layout: `messages` (role/content) or `conversations` (from/value) ending with the rated assistant answer, the rating in
`kto_tag` or `label`, an optional top-level `system`). The web page's thumbs up / down are conversational records.

Encoding is SFT's (`Template.encode`) as for pairs: `prompt_ids` is the conversation up to the answer, `completion_ids`
the tokens SFT labels for that answer (the answer and its end-of-turn). Too long: prompt turns dropped from the left,
then prompt tokens; an answer alone too long drops the record (counted).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from common.conversation import (OPENAI_ROLES, BadRecord, Turn, drop_reasoning, messages_to_turns, required_field,
                                 text_field, with_system, without_reasoning)
from common.formats import SHAREGPT_ROLES, LoadReport, read_file
from common.pairs import (PAIR_READERS, answered, detect_pair_format, fit_prompt, is_pair_record, is_single_rating,
                          message_answer, scored, with_top_system)
from common.templates import Template

RATED_COLUMNS = ("prompt_ids", "completion_ids", "label")


@dataclass
class Rated:
    prompt: list[Turn]  # earlier turns (context, answered) and the user's last turn (output None)
    completion: str
    label: bool  # True: a good (desirable) answer

    def without_reasoning(self) -> Rated:
        """The rated answer with every think block removed (data.thinking drop / nothink)."""
        return replace(self, prompt=drop_reasoning(self.prompt), completion=without_reasoning(self.completion))

    def conversation(self) -> list[Turn]:
        return answered(self.prompt, self.completion)

    def held_out_conversation(self) -> list[Turn] | None:
        """A good answer is what eval.py's held-out loss scores; a bad one is not."""
        return self.conversation() if self.label else None


# ---------------------------------------------------------------- per-format record readers

def _label(record: dict, key: str = "label") -> bool:
    value = required_field(record, key, object)
    if not isinstance(value, bool):
        raise BadRecord(key, f"expected true (a good answer) or false (a bad one), got {value!r}")
    return value


def read_conversational(record: dict) -> Rated:
    turns = messages_to_turns(required_field(record, "prompt", list), list_key="prompt", open_end=True)
    return Rated(turns, message_answer(required_field(record, "completion", object), "completion", OPENAI_ROLES),
                 _label(record))


def read_plain(record: dict) -> Rated:
    prompt = text_field(required_field(record, "prompt", str), "prompt")
    return Rated([Turn(prompt, None)], text_field(required_field(record, "completion", str), "completion"),
                 _label(record))


def read_sharegpt(record: dict) -> Rated:
    """LLaMA-Factory's KTO data: a conversation whose last message is the rated assistant answer."""
    if "messages" in record:
        key, role, content, roles = "messages", "role", "content", OPENAI_ROLES
    else:
        key, role, content, roles = "conversations", "from", "value", SHAREGPT_ROLES
    messages = required_field(record, key, list)
    if not messages:
        raise BadRecord(key, "empty (expected the conversation up to the rated answer)")
    answer = message_answer(messages[-1], f"{key}[{len(messages) - 1}]", roles, role, content)
    turns = messages_to_turns(messages[:-1], role, content, roles, key, open_end=True)
    return Rated(with_top_system(turns, record.get("system")), answer, _label(record, "kto_tag" if "kto_tag" in record
                                                                               else "label"))


RATED_READERS = {"conversational": read_conversational, "plain": read_plain, "sharegpt": read_sharegpt}


def detect_rated_format(record) -> str | None:
    if not is_single_rating(record):
        return None
    if "messages" in record or "conversations" in record:
        return "sharegpt"
    return "plain" if isinstance(record.get("prompt"), str) else "conversational"


def rated_reader(fmt: str | None):
    """A reader of rated answers in `fmt` (None: each record's own layout) that also takes preference pairs, each as
    two rated answers, the chosen good and the rejected bad (as TRL's KTOTrainer unpairs a paired dataset): a run's
    ratings file holds the web page's thumbs and Compare's pairs side by side."""
    def read(record: dict) -> list[Rated]:
        if is_pair_record(record):
            pair = PAIR_READERS[fmt or detect_pair_format(record)](record)
            return [Rated(pair.prompt, pair.chosen, True), Rated(pair.prompt, pair.rejected, False)]
        layout = fmt or detect_rated_format(record)
        if layout is None:
            raise BadRecord("label", "missing (expected an answer rated true or false, or a preference pair)")
        return [RATED_READERS[layout](record)]
    return read


def load_rated(paths: list[str], fmt: str = "auto", on_bad_record: str = "error",
               report: LoadReport | None = None) -> list[Rated]:
    """All rated answers of all files, in order, a preference pair as two. Broken records raise UserError (one line),
    or are skipped."""
    report = LoadReport() if report is None else report
    unknown = ("no rated answers (no record has `label` or `kto_tag`) and no preference pairs; train.method kto trains "
               "on answers rated good or bad, sft on conversations")
    layout = None if fmt == "auto" else fmt
    detect = lambda record: "rated" if is_single_rating(record) or is_pair_record(record) else None  # noqa: E731
    return [r for name in paths for read in read_file(Path(name), "auto", {"rated": rated_reader(layout)}, detect,
                                                      unknown, on_bad_record, report) for r in read]


# ---------------------------------------------------------------- encoding

@dataclass
class RatedStats:
    records: int = 0
    examples: int = 0
    desirable: int = 0
    undesirable: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    shortened: int = 0  # examples whose prompt lost turns or tokens to fit max_length
    turns_dropped: int = 0
    prompt_tokens_cut: int = 0
    dropped: int = 0  # examples whose answer alone does not fit max_length
    skipped: int = 0  # broken records skipped (on_bad_record: skip)


def encode_rated(tokenizer, template: Template, rated: Rated) -> dict:
    prompt_ids, completion_ids = scored(tokenizer, template, rated.conversation())
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": rated.label}


def encode_all(records: list[Rated], tokenizer, template: Template, max_length: int,
               default_system: str | None = None) -> tuple[list[dict], RatedStats]:
    stats, rows = RatedStats(), []
    for r in records:
        stats.records += 1
        def encode(prompt: list[Turn], r=r) -> dict:
            return encode_rated(tokenizer, template, Rated(prompt, r.completion, r.label))

        row = fit_prompt(tokenizer, encode, with_system(r.prompt, default_system), max_length, stats,
                         ("completion_ids",))
        if row is None:
            continue
        rows.append(row)
        stats.examples += 1
        stats.desirable += r.label
        stats.undesirable += not r.label
        stats.prompt_tokens += len(row["prompt_ids"])
        stats.completion_tokens += len(row["completion_ids"])
    return rows, stats
