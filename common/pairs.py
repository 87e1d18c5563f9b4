"""Preference pairs: data files -> pairs (a prompt of turns, a chosen and a rejected answer) -> the token rows TRL's
preference trainers take (`prompt_ids`, `chosen_ids`, `rejected_ids`).

Four formats, told apart per file like the SFT formats (common/formats.py, whose file reading and bad-record errors
these readers share): `conversational` (XTuner's and TRL's: `prompt` a list of messages, `chosen`/`rejected` assistant
messages; TRL's implicit prompt, where both sides are whole conversations, too), `plain` (TRL's strings: the prompt is
one user turn), `sharegpt` and `alpaca` (LLaMA-Factory's pair layouts). A prompt is untrained context; the last turn of
a prompt is the user's. To add a format: a reader `record -> Pair` in PAIR_READERS and a rule in `detect_pair_format`.

Encoding goes through the SFT encoder (`Template.encode`), so a pair is token for token what SFT would make of the
prompt followed by each answer: `prompt_ids` is the conversation up to the final answer, `chosen_ids`/`rejected_ids`
are the tokens SFT labels for that answer (the answer and its end-of-turn; the untrained separator after it is not
part of what is scored). A pair longer than `data.max_length` loses prompt turns from the left (whole turns, the system
prompt kept), then prompt tokens from the left; answers are never cut: a pair whose answer alone does not fit is
dropped and counted.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from common.cli import UserError
from common.conversation import (OPENAI_ROLES, BadRecord, Turn, drop_reasoning, messages_to_turns, required_field,
                                 text_field, with_system, without_reasoning)
from common.formats import SHAREGPT_ROLES, LoadReport, read_file
from common.templates import IGNORE, Template

PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


@dataclass
class Pair:
    prompt: list[Turn]  # earlier turns (context, answered) and the user's last turn (output None)
    chosen: str
    rejected: str

    def held_out_conversation(self) -> list[Turn]:
        return self.conversation(self.chosen)

    def without_reasoning(self) -> Pair:
        """The pair with every think block removed (data.thinking drop / nothink), as SFT's conversations lose it."""
        return replace(self, prompt=drop_reasoning(self.prompt), chosen=without_reasoning(self.chosen),
                       rejected=without_reasoning(self.rejected))

    def conversation(self, answer: str) -> list[Turn]:
        return answered(self.prompt, answer)


def answered(prompt: list[Turn], answer: str) -> list[Turn]:
    """A prompt (context turns, then the user's last turn) answered with `answer`: what SFT would encode, with only
    that answer trained."""
    *context, last = prompt
    return [Turn(t.input, t.output, t.system, train=False) for t in context] + [Turn(last.input, answer, last.system)]


# ---------------------------------------------------------------- per-format record readers

def _pair(prompt: list[Turn], chosen: str, rejected: str) -> Pair:
    if chosen.strip() == rejected.strip():
        raise BadRecord("rejected", "identical to chosen (a pair needs two different answers)")
    return Pair(prompt, chosen, rejected)


def message_answer(value, side: str, roles: dict, role_key: str = "role", content_key: str = "content") -> str:
    """One assistant message, alone or as a one-message list (TRL writes `[{"role": "assistant", ...}]`)."""
    if isinstance(value, list):
        if len(value) != 1:
            raise BadRecord(side, f"expected one assistant message, got {len(value)} messages")
        value, side = value[0], f"{side}[0]"
    if not isinstance(value, dict):
        raise BadRecord(side, f"expected an assistant message, got {type(value).__name__}")
    role = required_field(value, role_key, str, f"{side}.")
    if roles.get(role) != "assistant":
        raise BadRecord(f"{side}.{role_key}", f"expected an assistant answer, got role {role!r}")
    return text_field(value.get(content_key), f"{side}.{content_key}")


def _implicit_prompt(chosen: list, rejected: list) -> tuple[list, list, list]:
    """TRL's implicit prompt: both sides are whole conversations; the prompt is the messages they share."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _side(record: dict, key: str):
    if key not in record:
        raise BadRecord(key, "missing")
    return record[key]


def read_conversational(record: dict) -> Pair:
    chosen, rejected = _side(record, "chosen"), _side(record, "rejected")
    if "prompt" in record:
        prompt = required_field(record, "prompt", list)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        prompt, chosen, rejected = _implicit_prompt(chosen, rejected)
    else:
        raise BadRecord("prompt", "missing")
    turns = messages_to_turns(prompt, list_key="prompt", open_end=True)
    return _pair(turns, message_answer(chosen, "chosen", OPENAI_ROLES),
                 message_answer(rejected, "rejected", OPENAI_ROLES))


def read_plain(record: dict) -> Pair:
    prompt = text_field(required_field(record, "prompt", str), "prompt")
    chosen = text_field(required_field(record, "chosen", str), "chosen")
    return _pair([Turn(prompt, None)], chosen, text_field(required_field(record, "rejected", str), "rejected"))


def with_top_system(turns: list[Turn], system) -> list[Turn]:
    if system is not None and not turns[0].system:
        turns[0] = Turn(turns[0].input, turns[0].output, text_field(system, "system", allow_empty=True), turns[0].train)
    return turns


def read_sharegpt(record: dict) -> Pair:
    """LLaMA-Factory: `conversations` ending with the human's turn, `chosen`/`rejected` as gpt messages, an optional
    top-level `system`."""
    turns = messages_to_turns(required_field(record, "conversations", list), "from", "value", SHAREGPT_ROLES, "conversations",
                              open_end=True)
    chosen = message_answer(required_field(record, "chosen", dict), "chosen", SHAREGPT_ROLES, "from", "value")
    rejected = message_answer(required_field(record, "rejected", dict), "rejected", SHAREGPT_ROLES, "from", "value")
    return _pair(with_top_system(turns, record.get("system")), chosen, rejected)


def read_alpaca(record: dict) -> Pair:
    """LLaMA-Factory: `instruction` + `input` (joined by a newline when the input is not empty, as LLaMA-Factory
    joins them), `chosen`/`rejected` strings, optional `system` and `history` ([[question, answer], ...])."""
    instruction = text_field(required_field(record, "instruction", str), "instruction")
    extra = text_field(record.get("input"), "input", allow_empty=True, allow_null=True)
    turns = []
    for i, item in enumerate(record.get("history") or []):
        if not (isinstance(item, list) and len(item) == 2):
            raise BadRecord(f"history[{i}]", "expected [question, answer]")
        turns.append(Turn(text_field(item[0], f"history[{i}][0]"), text_field(item[1], f"history[{i}][1]")))
    turns.append(Turn(instruction + "\n" + extra if extra else instruction, None))
    chosen = text_field(required_field(record, "chosen", str), "chosen")
    rejected = text_field(required_field(record, "rejected", str), "rejected")
    return _pair(with_top_system(turns, record.get("system")), chosen, rejected)


PAIR_READERS = {"conversational": read_conversational, "plain": read_plain, "sharegpt": read_sharegpt,
                "alpaca": read_alpaca}


def is_pair_record(record) -> bool:
    return isinstance(record, dict) and ("chosen" in record or "rejected" in record)


def is_single_rating(record) -> bool:
    """One answer rated good or bad (`label` or `kto_tag`, no chosen/rejected: common.unpaired), as the web page's
    thumbs write them into a run's ratings file beside Compare's pairs: what train.method kto reads, and what the
    pair readers pass over."""
    return isinstance(record, dict) and not is_pair_record(record) and ("label" in record or "kto_tag" in record)


def _passing_ratings(reader):
    return lambda record: None if is_single_rating(record) else reader(record)


def detect_pair_format(record) -> str | None:
    if not is_pair_record(record):
        return None
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    if isinstance(record.get("prompt"), str):
        return "plain"
    return "conversational"


def as_conversations(records: list) -> list[list[Turn]]:
    """Conversations as they are; a pair as its prompt answered with the chosen answer, a rated answer when it is
    rated good (common.unpaired): what eval.py scores the held-out loss on and takes its prompts from."""
    return [c for r in records if (c := r if isinstance(r, list) else r.held_out_conversation())]


# ---------------------------------------------------------------- files

def load_pairs(paths: list[str], fmt: str = "auto", on_bad_record: str = "error",
               report: LoadReport | None = None) -> list[Pair]:
    """All pairs of all files, in order (single rated answers beside them passed over, with a note). Broken records
    raise UserError (one line), or are skipped and counted."""
    report = LoadReport() if report is None else report
    unknown = ("no preference pairs (no record has `chosen` and `rejected`); train.method dpo and orpo train on pairs, "
               "sft on conversations")
    readers = {name: _passing_ratings(reader) for name, reader in PAIR_READERS.items()}
    read = [pair for name in paths
            for pair in read_file(Path(name), fmt, readers, detect_pair_format, unknown, on_bad_record, report)]
    pairs = [pair for pair in read if pair is not None]
    if len(pairs) < len(read):
        report.note(f"passed over {len(read) - len(pairs)} single rated answer(s) (thumbs up/down) beside the pairs: "
                    "train.method kto reads those")
    return pairs


# ---------------------------------------------------------------- encoding

@dataclass
class PairStats:
    records: int = 0
    pairs: int = 0
    prompt_tokens: int = 0
    chosen_tokens: int = 0
    rejected_tokens: int = 0
    shortened: int = 0  # pairs whose prompt lost turns or tokens to fit max_length
    turns_dropped: int = 0  # earlier prompt turns dropped from the left
    prompt_tokens_cut: int = 0  # prompt tokens cut from the left when its last turn alone did not fit
    dropped: int = 0  # pairs whose answer alone does not fit max_length
    skipped: int = 0  # broken records skipped (on_bad_record: skip)


def scored(tokenizer, template: Template, turns: list[Turn]) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the encoding up to the final answer's first label, and its labelled tokens."""
    ids, labels = template.encode_ids(tokenizer, turns)
    scored = [n for n, label in enumerate(labels) if label != IGNORE]
    if not scored:
        raise UserError(f"template `{template.name}` labels no token of the answer {turns[-1].output[:40]!r}")
    return ids[:scored[0]], ids[scored[0]:scored[-1] + 1]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_pair(tokenizer, template: Template, pair: Pair) -> dict:
    """A pair as rows of token ids. The prompt is what both answers share: the SFT encoding before each answer's
    first labelled token (a token merged across the prompt's end, as TRL also finds, goes to the answers)."""
    chosen_prompt, chosen = scored(tokenizer, template, pair.conversation(pair.chosen))
    rejected_prompt, rejected = scored(tokenizer, template, pair.conversation(pair.rejected))
    n = _common_prefix(chosen_prompt, rejected_prompt)
    return {"prompt_ids": chosen_prompt[:n], "chosen_ids": chosen_prompt[n:] + chosen,
            "rejected_ids": rejected_prompt[n:] + rejected}


def _drop_first_turn(prompt: list[Turn]) -> list[Turn]:
    """The prompt without its first turn, whose system prompt moves to the next (as samples' split windows do)."""
    first, rest = prompt[0], list(prompt[1:])
    if first.system and not rest[0].system:
        rest[0] = Turn(rest[0].input, rest[0].output, first.system, rest[0].train)
    return rest


def fit_prompt(tokenizer, encode, prompt: list[Turn], max_length: int, stats, answers: tuple[str, ...]) -> dict | None:
    """`encode(prompt turns)`'s row within max_length (its prompt + the longest of its `answers` ids), or None
    (counted as dropped) when an answer alone does not fit: earlier prompt turns dropped from the left, then prompt
    tokens cut from the left. `stats` counts shortened, turns_dropped, prompt_tokens_cut and dropped (pairs here;
    the rated answers of common.unpaired too)."""
    row = encode(prompt)
    answer = max(len(row[key]) for key in answers)
    if answer >= max_length:  # at least one prompt token must precede the answer
        stats.dropped += 1
        return None
    shortened = False
    while len(row["prompt_ids"]) + answer > max_length and len(prompt) > 1:
        prompt, shortened = _drop_first_turn(prompt), True
        stats.turns_dropped += 1
        row = encode(prompt)
    over = len(row["prompt_ids"]) + answer - max_length
    if over > 0:  # the last user turn alone is too long: cut it from the left, keeping a leading BOS
        ids = row["prompt_ids"]
        head = 1 if tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id else 0
        row["prompt_ids"] = ids[:head] + ids[head + over:]
        stats.prompt_tokens_cut += over
        shortened = True
    stats.shortened += shortened
    return row


def fit_pair(tokenizer, template: Template, pair: Pair, max_length: int, stats: PairStats) -> dict | None:
    """The pair's row within max_length (prompt + the longer answer), or None (dropped) when an answer does not fit."""
    def encode(prompt: list[Turn]) -> dict:
        return encode_pair(tokenizer, template, Pair(prompt, pair.chosen, pair.rejected))

    return fit_prompt(tokenizer, encode, pair.prompt, max_length, stats, ("chosen_ids", "rejected_ids"))


def encode_pairs(pairs: list[Pair], tokenizer, template: Template, max_length: int, default_system: str | None = None,
                 stats: PairStats | None = None) -> tuple[list[dict], PairStats]:

    stats = PairStats() if stats is None else stats
    rows = []
    for pair in pairs:
        stats.records += 1
        row = fit_pair(tokenizer, template, Pair(with_system(pair.prompt, default_system), pair.chosen, pair.rejected),
                       max_length, stats)
        if row is None:
            continue
        rows.append(row)
        stats.pairs += 1
        stats.prompt_tokens += len(row["prompt_ids"])
        stats.chosen_tokens += len(row["chosen_ids"])
        stats.rejected_tokens += len(row["rejected_ids"])
    return rows, stats
