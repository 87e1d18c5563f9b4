"""The chat REPL around the generation core: a conversation kept as messages (trimmed from the oldest turn when it
outgrows the context), the terminal (prompts, colours, multi-line input, plain output when piped) and the commands.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

from common.cli import UserError
from common.generation import Generator, PromptTooLong, Sampling, no_room


@dataclass
class Reply:
    text: str
    interrupted: bool = False  # Ctrl-C: the text is what had been shown
    cut: bool = False  # ended by max-new-tokens, not by a stop word or EOS
    dropped: int = 0  # oldest turns dropped from the history to fit this prompt


@dataclass
class ChatSession:
    """One conversation: its history as messages, re-rendered every turn by the template exactly as training
    encodes it. The system prompt goes on the first turn still in the history, as training puts it on a
    conversation's (and each `split` window's) first turn."""

    generator: Generator
    sampling: Sampling
    system: Optional[str] = None
    history: list[dict] = field(default_factory=list)  # user and assistant messages, oldest first

    def __post_init__(self):
        problem = no_room(self.sampling.max_new_tokens, self.generator.max_length, "--max-new-tokens")
        if problem:
            raise UserError(f"{problem} (see --max-length)")
        self.generator.prompt_ids(self.messages(""))  # a template that cannot render a conversation fails now

    @property
    def budget(self) -> int:
        return self.generator.max_length - self.sampling.max_new_tokens

    def reset(self) -> None:
        self.history.clear()

    def messages(self, message: str, start: int = 0) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history[2 * start:] + [{"role": "user", "content": message}]

    def fit(self, message: str) -> tuple[list[dict], int]:
        """The messages to answer, and how many of the oldest turns were dropped (for good) to fit the budget."""
        turns = len(self.history) // 2
        for start in range(turns + 1):
            messages = self.messages(message, start)
            n = len(self.generator.prompt_ids(messages))
            if n <= self.budget:
                del self.history[: 2 * start]
                return messages, start
        raise PromptTooLong(f"the message is {n} tokens with the template, more than the {self.budget} the "
                            f"context allows ({self.generator.max_length} minus {self.sampling.max_new_tokens} for the answer)")

    def reply(self, message: str, on_text: Callable[[str], None] = lambda text: None) -> Reply:
        """Answer `message`, streaming the visible text to on_text; the exchange joins the history. Ctrl-C during
        generation ends the answer early: what was shown is kept as the answer."""
        messages, dropped = self.fit(message)
        completion = self.generator.generate(messages, self.sampling, on_text)
        self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": completion.text}]
        return Reply(completion.text, interrupted=completion.ended_by == "interrupted",
                     cut=completion.ended_by == "length", dropped=dropped)


class Console:
    """Prompts and colours in a terminal; plain text otherwise (pipes, --once)."""

    def __init__(self, interactive: bool, stream: bool, lines=None):
        """lines: where piped messages come from (default: stdin)."""
        self.interactive, self.stream, self.pending = interactive, stream, []
        self.lines = lines if lines is not None else sys.stdin
        self.colour = interactive and sys.stdout.isatty() and "NO_COLOR" not in os.environ

    def _paint(self, code: str, text: str, prompt: bool = False) -> str:
        if not self.colour:
            return text
        wrap = ("\001", "\002") if prompt else ("", "")  # readline must not count escape codes as columns
        return f"{wrap[0]}\033[{code}m{wrap[1]}{text}{wrap[0]}\033[0m{wrap[1]}"

    def read(self) -> str:
        """One message: lines ending with \\ continue onto the next. EOFError at the end of input."""
        lines, prompt = [], ">>> "
        while True:
            line = input(self._paint("1;32", prompt, True)) if self.interactive else self.lines.readline()
            if not self.interactive and not line:
                raise EOFError
            line = line.rstrip("\r\n")
            if not line.endswith("\\"):
                return "\n".join(lines + [line])
            lines.append(line[:-1])
            prompt = "... "

    def text(self, chunk: str) -> None:
        if self.stream:
            sys.stdout.write(self._paint("36", chunk))
            sys.stdout.flush()
        else:
            self.pending.append(chunk)

    def end_answer(self, reply) -> None:
        if not self.stream:
            sys.stdout.write(self._paint("36", "".join(self.pending)))
            self.pending = []
        sys.stdout.write("" if reply.text.endswith("\n") else "\n")
        sys.stdout.flush()
        if reply.interrupted:
            self.note("answer stopped (Ctrl-C); it stays in the history as shown")
        elif reply.cut:
            self.note("answer cut at --max-new-tokens")

    def note(self, text: str) -> None:
        print(self._paint("2;33", f"[{text}]"), file=sys.stderr, flush=True)


def converse(session, console: Console, messages) -> None:
    """Run the conversation: messages yields (where, text) pairs; commands act on the session."""
    for where, message in messages:
        command, _, rest = message.strip().partition(" ")
        if command in ("/exit", "EXIT"):
            return
        if command in ("/reset", "RESET"):
            session.reset()
            console.note("history cleared")
            continue
        if command == "/system":
            session.system = rest.strip() or None
            console.note(f"system prompt {'set' if session.system else 'cleared'}; it applies to the whole history")
            continue
        if not message.strip():
            continue
        try:
            reply = session.reply(message, console.text)
        except PromptTooLong as e:
            if not console.interactive:
                raise UserError(f"{where}: {e}") from None
            console.note(f"not sent: {e}")
            continue
        console.end_answer(reply)
        if reply.dropped:
            console.note(f"the history no longer fits in {session.budget} tokens: dropped the {reply.dropped} "
                         f"oldest turn{'s' * (reply.dropped > 1)}")


def repl_messages(console: Console):
    number = 0
    while True:
        try:
            message = console.read()
        except KeyboardInterrupt:  # Ctrl-C at the prompt discards the line, as a shell does
            print(file=sys.stderr)
            continue
        except EOFError:  # Ctrl-D, or the end of piped input
            if console.interactive:
                print(file=sys.stderr)
            return
        number += 1
        yield f"input line {number}", message
