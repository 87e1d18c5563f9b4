"""The conversation model, the one shape every part of the project speaks:

- a conversation is a list of `Turn`s: a user input, its answer (None on a last turn still to be answered), the
  system prompt that precedes it, and whether the answer is trained;
- chat clients, the REPL's history, the API and most data files speak in OpenAI-style messages
  ({"role", "content"}): `messages_to_turns` and `turns_to_messages` convert between the two;
- a window of whole turns is a conversation of its own, its system prompt on its first turn (`window`,
  `with_system`): training's `split` windows and a recipe's default system prompt both go through here.

Who does what with it: templates.py encodes turns into tokens, formats.py reads them from files, samples.py cuts
and packs them into training samples; the generation core and the server take messages and convert them here.
A record that is not a conversation raises `BadRecord`, naming the field and what was expected.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Optional


@dataclass
class Turn:
    input: str
    output: Optional[str]  # None on the last turn: encode up to the generation prompt (chat)
    system: Optional[str] = None
    train: bool = True  # False: the output is context only (openai `"loss": false`)


# Reasoning in an answer: a think block at its start (Qwen3, DeepSeek-R1 write it so; OpenAI's `reasoning_content` is
# read into the same form), so that one string carries it through every format, template and export.
THINK_BLOCK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)


def with_reasoning(answer: str, reasoning: str | None) -> str:
    return f"<think>\n{reasoning.strip()}\n</think>\n\n{answer}" if reasoning and reasoning.strip() else answer


def without_reasoning(text: str) -> str:
    """The answer without its think block (what a user sees when thinking is off)."""
    return THINK_BLOCK.sub("", text, count=1)


def drop_reasoning(turns: list[Turn]) -> list[Turn]:
    return [replace(t, output=without_reasoning(t.output)) if t.output else t for t in turns]


class BadRecord(Exception):
    """One broken record (of a data file, or a request's messages); `field` names where in the record, message says
    what was expected."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field {field}: {message}" if field else message)


def text_field(value, where: str, *, allow_empty: bool = False, allow_null: bool = False) -> str:
    """A record's string field, or BadRecord."""
    if value is None and allow_null:
        return ""
    if not isinstance(value, str):
        raise BadRecord(where, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRecord(where, "empty")
    return value


def required_field(record: dict, key: str, kind: type, where: str = ""):
    """record[key], which must be there and be a `kind`, or BadRecord."""
    if key not in record:
        raise BadRecord(where + key, "missing")
    value = record[key]
    if not isinstance(value, kind):
        raise BadRecord(where + key, f"expected a {kind.__name__}, got {type(value).__name__}")
    return value


OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}


def messages_to_turns(messages: list, role_key: str = "role", content_key: str = "content", roles: dict | None = None,
                      list_key: str = "messages", open_end: bool = False) -> list[Turn]:
    """XTuner's openai mapping: skip leading assistant messages, join consecutive user messages, attach a system
    message to the next turn, honour `"loss": false`. Trailing unanswered user messages are dropped (training data),
    or, with open_end (chat, the API), become the last turn, to be answered. `roles` maps a format's role names to
    ours (ShareGPT's `human`/`gpt`)."""
    roles = roles or OPENAI_ROLES
    turns, system, user = [], None, ""
    started = pending = False  # pending: a user message waits for its answer
    for i, message in enumerate(messages):
        where = f"{list_key}[{i}]"
        if not isinstance(message, dict):
            raise BadRecord(where, f"expected an object, got {type(message).__name__}")
        raw_role = required_field(message, role_key, str, f"{where}.")
        if raw_role not in roles:
            raise BadRecord(f"{where}.{role_key}", f"unknown role {raw_role!r} (expected one of {', '.join(roles)})")
        role = roles[raw_role]
        # an empty answer is a broken training record, but a possible chat history (an answer stopped at once)
        content = text_field(message.get(content_key), f"{where}.{content_key}",
                             allow_empty=role != "assistant" or open_end)
        if role == "assistant" and not started:
            continue
        started = True
        if role == "system":
            system = content
        elif role == "user":
            user += content
            pending = True
        else:
            loss = message.get("loss", True)
            reasoning = message.get("reasoning_content")
            if reasoning is not None:
                content = with_reasoning(content, text_field(reasoning, f"{where}.reasoning_content", allow_empty=True))
            turns.append(Turn(input=user, output=content, system=system, train=str(loss).lower() == "true"))
            system, user, pending = None, "", False
    if open_end:
        if not pending:
            raise BadRecord(list_key, "no user message to answer (the last message must be from the user)")
        turns.append(Turn(input=user, output=None, system=system))
    return turns


def turns_to_messages(turns: list[Turn]) -> list[dict]:
    """The conversation as OpenAI-style messages: a turn's system prompt before its user message, an answer after
    it unless the turn is still to be answered."""
    messages = []
    for turn in turns:
        if turn.system:
            messages.append({"role": "system", "content": turn.system})
        messages.append({"role": "user", "content": turn.input})
        if turn.output is not None:
            messages.append({"role": "assistant", "content": turn.output})
    return messages


def with_system(turns: list[Turn], system: str | None) -> list[Turn]:
    """The conversation with `system` on its first turn when that turn has none (data.system, a window's)."""
    if system and turns and not turns[0].system:
        return [Turn(turns[0].input, turns[0].output, system, turns[0].train)] + turns[1:]
    return turns


def window(turns: list[Turn], start: int, end: int | None = None) -> list[Turn]:
    """Turns start..end as a conversation of their own: the conversation's system prompt (on its first turn) goes on
    the window's first turn, unless that turn has its own, as it would start a conversation."""
    return with_system(turns[start:end], turns[0].system)
