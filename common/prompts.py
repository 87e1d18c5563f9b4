"""Prompts, the data of train.method grpo and of eval.py's reward table: conversations to be answered (earlier turns
answered, the last user turn open), read from any file the suite reads:

- a conversation file (XTuner, Alpaca, ShareGPT, OpenAI; common/formats.py): each user turn, with its earlier turns as
  context, is a prompt (a conversation of three turns gives three);
- a preference-pair file (common/pairs.py): each pair's prompt;
- a prompt-only file (`data.format: prompt`): records `{"prompt": "text"}` or `{"prompt": [messages]}` (TRL's
  prompt-only layouts), with an optional `system`.

Encoded by the recipe's template exactly as chat and SFT encode a conversation up to its answer (`template.encode_ids`
of the open turns). A prompt longer than data.max_length minus grpo.max_completion_length loses earlier turns from
the left (as pairs do); one whose last turn alone does not fit is dropped, and counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.conversation import BadRecord, Turn, messages_to_turns, required_field, text_field, turns_to_messages
from common.formats import FORMAT_READERS, LoadReport, detect_format, read_file
from common.pairs import PAIR_READERS, detect_pair_format, is_pair_record


@dataclass
class Prompt:
    turns: list[Turn]  # earlier turns (answered) and the user's last turn (output None)

    @property
    def messages(self) -> list[dict]:
        return turns_to_messages(self.turns)

    def held_out_conversation(self) -> None:
        """A prompt has no answer: eval.py's held-out loss has nothing to score (its rewards table answers it)."""
        return None


def open_turns(turns: list[Turn]) -> list[Prompt]:
    """Each user turn of a conversation with its earlier turns as context (the system prompt stays on the first)."""
    return [Prompt([Turn(t.input, t.output, t.system, False) for t in turns[:i]] +
                   [Turn(turns[i].input, None, turns[i].system)]) for i in range(len(turns))]


def read_prompt_only(record: dict) -> list[Prompt]:
    prompt = required_field(record, "prompt", (str, list))
    if isinstance(prompt, str):
        turns = [Turn(text_field(prompt, "prompt"), None)]
    else:
        turns = messages_to_turns(prompt, list_key="prompt", open_end=True)
    system = record.get("system")
    if system is not None and not turns[0].system:
        turns[0] = Turn(turns[0].input, None if len(turns) == 1 else turns[0].output,
                        text_field(system, "system", allow_empty=True), turns[0].train)
    return [Prompt(turns)]


def _from_pairs(read):
    return lambda record: [Prompt(read(record).prompt)]


def _from_conversations(read):
    return lambda record: open_turns(read(record))


def _either(conversation, pair):
    """A layout both kinds share (ShareGPT, Alpaca): a record with chosen/rejected is a pair."""
    return lambda record: pair(record) if is_pair_record(record) else conversation(record)


PROMPT_READERS = {"prompt": read_prompt_only,
                  **{name: _from_conversations(read) for name, read in FORMAT_READERS.items()},
                  **{name: _from_pairs(read) for name, read in PAIR_READERS.items()}}
for _name in set(FORMAT_READERS) & set(PAIR_READERS):
    PROMPT_READERS[_name] = _either(_from_conversations(FORMAT_READERS[_name]), _from_pairs(PAIR_READERS[_name]))


def is_prompt_record(record) -> bool:
    return isinstance(record, dict) and "prompt" in record and not is_pair_record(record) and "completion" not in record


def detect_prompt_format(record) -> str | None:
    if is_prompt_record(record):
        return "prompt"
    return detect_pair_format(record) or detect_format(record)


def load_prompts(paths: list[str], fmt: str = "auto", on_bad_record: str = "error",
                 report: LoadReport | None = None) -> list[Prompt]:
    report = LoadReport() if report is None else report
    unknown = "cannot tell the data format (no record has a prompt, a pair or a conversation); set data.format"
    return [prompt for name in paths
            for prompts in read_file(Path(name), fmt, PROMPT_READERS, detect_prompt_format, unknown, on_bad_record,
                                     report)
            for prompt in prompts]


# ---------------------------------------------------------------- encoding

@dataclass
class PromptStats:
    records: int = 0  # prompts read
    prompts: int = 0  # prompts kept
    prompt_tokens: int = 0
    longest: int = 0
    shortened: int = 0  # prompts that lost earlier turns to fit
    dropped: int = 0  # prompts whose last turn alone does not fit
    skipped: int = 0  # broken records skipped (on_bad_record: skip)
    lengths: list = field(default_factory=list, repr=False)


def fit_prompt(tokenizer, template, prompt: Prompt, budget: int,
               system: str | None) -> tuple[list[int], Prompt, bool] | None:
    """(ids, the prompt as encoded, shortened?) with at most `budget` tokens, earlier turns dropped from the left
    (the system prompt kept on the new first turn); None when the last turn alone is too long."""
    from common.conversation import window, with_system

    turns = with_system(prompt.turns, system)
    for start in range(len(turns)):
        kept = window(turns, start)
        ids = template.encode_ids(tokenizer, kept)[0]
        if len(ids) <= budget:
            return ids, Prompt(kept), start > 0
    return None


def encode_prompts(prompts: list[Prompt], tokenizer, template, budget: int, system: str | None = None):
    """(rows, stats): each row the prompt's messages (what rewards and the judge read) and its ids."""
    rows, stats = [], PromptStats(records=len(prompts))
    for prompt in prompts:
        fitted = fit_prompt(tokenizer, template, prompt, budget, system)
        if fitted is None:
            stats.dropped += 1
            continue
        ids, kept, shortened = fitted
        stats.shortened += shortened
        stats.prompt_tokens += len(ids)
        stats.longest = max(stats.longest, len(ids))
        rows.append({"prompt": kept.messages, "prompt_ids": ids})
    stats.prompts = len(rows)
    return rows, stats


def messages_prompt_ids(tokenizer, template, messages: list[dict]) -> list[int]:
    """A row's prompt ids again from its messages (what TRL hands a rollout): the same encoding as encode_prompts."""
    try:
        return template.encode_ids(tokenizer, messages_to_turns(messages, open_end=True))[0]
    except BadRecord as e:  # our own rows: a failure here is a bug, not the user's data
        raise AssertionError(str(e)) from None
