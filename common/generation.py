"""The generation core: messages in, text out (streamed). Stateless: a `Generator` holds a model, its tokenizer, the
template and the stop words and EOS ids that end an answer; each call takes a list of {"role", "content"} messages
and `Sampling` settings, renders the prompt exactly as training encodes it, and returns a `Completion`. The chat REPL,
the evaluation-prompt callback, eval.py and the API server all answer through it, so they end answers alike. The
tokens come from common/decoding.py (one answer alone here; the server batches several answers there).
"""
from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass
from typing import Callable, Optional

from common.cli import UserError
from common.conversation import BadRecord, messages_to_turns
from common.decoding import Decoder, PromptCache, Row
from common.templates import Template


# Temperatures below this are greedy: dividing logits by 1e-300 overflows to inf and the sampler's softmax to NaN,
# while at 1e-3 a logit lead of 0.05 already gives the top token all but e^-50 of the probability.
GREEDY_BELOW = 1e-3


@dataclass
class Sampling:
    """How to pick tokens, and how many. temperature 0 = greedy (top_k/top_p then play no part), and so is any
    temperature below GREEDY_BELOW."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None  # sampling reproducible per call, without moving the process's RNG

    @classmethod
    def from_evaluation(cls, evaluation, **overrides) -> Sampling:
        """A recipe's `evaluation` section (the run's preview settings), with explicit values winning."""
        values = {k: getattr(evaluation, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k")}
        return cls(**{**values, **{k: v for k, v in overrides.items() if v is not None}})


@dataclass
class Completion:
    text: str  # the answer as shown: no stop word, no EOS, no half character
    prompt_tokens: int
    completion_tokens: int  # generated tokens, EOS included
    ended_by: str  # eos | stop_word | length | interrupted (Ctrl-C) | cancelled (the caller's `cancelled()`)

    @property
    def finish_reason(self) -> str:
        """OpenAI's vocabulary: `length` when cut at max_new_tokens, else `stop`."""
        return "length" if self.ended_by == "length" else "stop"


class PromptTooLong(UserError):
    pass


class BadMessages(UserError):
    """Messages that do not form a conversation to answer (unknown role, nothing from the user...)."""


class StopWordStream:
    """Decodes the answer as it grows, hands on the text that is safe to show, and tells the decoder to stop at the
    first stop word or when the caller has given up (`cancelled()`). One object both decides to stop and decides what
    to print. A tail that could be the start of a stop word (which may span several tokens), or half of a UTF-8
    character, is held back until it is resolved. EOS ids end the answer in the decoder; they are dropped from the
    text here.
    """

    def __init__(self, tokenizer, stop_words: list[str], eos_ids: set[int], on_text: Callable[[str], None],
                 cancelled: Callable[[], bool] = lambda: False, hide_reasoning: bool = False):
        self.tokenizer, self.hide_reasoning = tokenizer, hide_reasoning
        self.stop_words = [w for w in stop_words if w]
        self.eos_ids, self.on_text, self.cancelled = eos_ids, on_text, cancelled
        self.text, self.shown, self.stopped = "", 0, False
        self.was_cancelled = False

    def should_stop(self, answer_ids: list[int]) -> bool:
        """decoding.Row's stop test, after each token: all answer ids so far."""
        self.feed(answer_ids)
        if not self.stopped and self.cancelled():
            self.was_cancelled = True
        return self.stopped or self.was_cancelled

    def feed(self, answer_ids: list[int]) -> None:
        """All answer ids so far (not just the new one): decoding them together keeps multi-token characters whole."""
        if self.stopped:
            return
        ids = [i for i in answer_ids if i not in self.eos_ids]
        self.text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if self.hide_reasoning:
            self.text = _past_reasoning(self.text)
        hits = [i for i in (self.text.find(w, max(self.shown - len(w), 0)) for w in self.stop_words) if i >= 0]
        if hits:
            self.stopped = True
            self._show(min(hits))
        else:
            self._show(len(self.text) - self._unresolved_tail())

    def finish(self) -> None:
        """Generation ended without a stop word (EOS or max-new-tokens): the held-back tail is plain text, except
        half a character cut off by max-new-tokens, which would print as U+FFFD."""
        if not self.stopped:
            self._show(len(self.text.rstrip("\ufffd")))

    @property
    def answer(self) -> str:
        return self.text[: self.shown]

    def _unresolved_tail(self) -> int:
        text, hold = self.text, len(self.text) - len(self.text.rstrip("\ufffd"))
        for word in self.stop_words:
            for k in range(min(len(word) - 1, len(text)), hold, -1):
                if text.endswith(word[:k]):
                    hold = k
                    break
        return hold

    def _show(self, end: int) -> None:
        if end > self.shown:
            chunk, self.shown = self.text[self.shown:end], end  # counted as shown even if Ctrl-C lands mid-print
            self.on_text(chunk)


def _past_reasoning(text: str) -> str:
    """The answer a user sees when thinking is off: a think block the model writes all the same is not shown (held
    back while it, or the tag that would open it, is still open)."""
    stripped = text.lstrip()
    if stripped.startswith("<think>"):
        end = stripped.find("</think>")
        return "" if end < 0 else stripped[end + len("</think>"):].lstrip()
    return "" if stripped and "<think>".startswith(stripped) else text


def eos_ids(tokenizer, model) -> set[int]:
    """The tokenizer's EOS and every EOS the model's generation_config names (chat models often list several)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured if isinstance(configured, (list, tuple)) else [configured] if configured is not None else [])
    return ids


def no_room(max_new_tokens: int, context: Optional[int], name: str = "max_new_tokens") -> Optional[str]:
    """What is wrong when an answer of max_new_tokens leaves the prompt no token of the context, else None. The
    REPL (at start-up), the server (per request) and every generation ask here; each raises its own kind of error.
    `name`: the setting as its caller's user spells it (--max-new-tokens, max_tokens)."""
    if context is not None and max_new_tokens >= context:
        return f"{name} {max_new_tokens} leaves no room for the prompt in a context of {context} tokens"
    return None


def adapter_switch(model, on: bool):
    """A context in which the model answers with its PEFT adapter (on) or as its base (off): PEFT's
    disable_adapter(), the switch eval.py's Contestants use for the base, so one load serves both."""
    if on:
        return contextlib.nullcontext()
    if not hasattr(model, "disable_adapter"):
        raise ValueError("the model has no adapter to switch off")
    return model.disable_adapter()


class Generator:
    """Answers conversations with one model, in one template. Holds no conversation: callers pass the messages."""

    def __init__(self, model, tokenizer, template: Template, max_length: Optional[int] = None,
                 extra_stop_words: list[str] = (), fast=None, prompt_cache_mb: float = 0):
        """fast: the model's compiled decode step (common.decode_step.FastStep), used for answers with the adapter
        as loaded; None: eager decoding throughout. prompt_cache_mb: keep the prompts prefilled last, up to this much
        for the adapter's answers and as much for the base's, so that a prompt beginning as one of them did prefills
        only the rest (decoding.PromptCache; 0: none, as for a model that is still training)."""
        self.model, self.tokenizer, self.template, self.max_length = model, tokenizer, template, max_length
        self.fast = fast
        self.prompts = {adapter: PromptCache(prompt_cache_mb) for adapter in (True, False)} if prompt_cache_mb else {}
        self.stop_words = template.stop_words(tokenizer) + [w for w in extra_stop_words if w]
        self.eos_ids = eos_ids(tokenizer, model)

    def prompt_ids(self, messages: list[dict], template: Optional[Template] = None) -> list[int]:
        """The ids to generate from: the messages encoded by the template, ending with the generation prompt."""
        try:
            turns = messages_to_turns(messages, open_end=True)
        except BadRecord as e:
            raise BadMessages(str(e)) from None
        return (template or self.template).prompt_ids(self.tokenizer, turns)

    def check_could_fit(self, messages: list[dict], sampling: Sampling) -> None:
        """Refuse, before tokenizing, messages whose text alone needs more tokens than the context leaves: a token
        covers at most `longest_token` characters, so n characters take at least n / longest_token tokens. A 1 MiB
        prompt (the server's default body limit) is refused at once instead of after a tokenization of half a
        second or more."""
        characters = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
        self.check_fits(-(-characters // self.longest_token), sampling,
                        f"has {characters} characters, at least {{}} tokens")

    @functools.cached_property
    def longest_token(self) -> int:
        """The most characters one token of the vocabulary stands for (as the vocabulary spells it: byte-level BPE
        spells each byte as one character, so this bounds text characters too)."""
        return max((len(piece) for piece in self.tokenizer.get_vocab()), default=1) or 1

    def check_fits(self, prompt_tokens: int, sampling: Sampling,
                   counted: str = "is {} tokens with the template") -> None:
        """PromptTooLong when an answer of max_new_tokens leaves no room, or prompt_tokens exceed what it leaves;
        `counted` says how prompt_tokens was counted, in the message."""
        if self.max_length is None:
            return
        problem = no_room(sampling.max_new_tokens, self.max_length)
        if problem:
            raise PromptTooLong(problem)
        budget = self.max_length - sampling.max_new_tokens
        if prompt_tokens > budget:
            raise PromptTooLong(f"the conversation {counted.format(prompt_tokens)}, more than the {budget} the "
                                f"context allows ({self.max_length} minus {sampling.max_new_tokens} for the answer)")

    def generation_config(self, sampling: Sampling):
        """generate()'s settings for the same answer: what the decoder's output is checked against (tests, bench)."""
        config = copy.deepcopy(self.model.generation_config)
        sample = sampling.temperature >= GREEDY_BELOW
        # Unset sampling knobs when greedy: transformers warns about flags that would have no effect.
        config.update(max_new_tokens=sampling.max_new_tokens, do_sample=sample,
                      temperature=sampling.temperature if sample else None,
                      top_k=sampling.top_k if sample else None, top_p=sampling.top_p if sample else None,
                      repetition_penalty=sampling.repetition_penalty, eos_token_id=sorted(self.eos_ids) or None,
                      pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                      else next(iter(self.eos_ids), None))
        return config

    def start(self, messages: list[dict], sampling: Sampling, on_text: Callable[[str], None] = lambda text: None,
              cancelled: Callable[[], bool] = lambda: False, stop: list[str] = (),
              switches: Optional[dict] = None) -> Answering:
        """An answer ready to decode (a decoding.Row and its text stream), or BadMessages / PromptTooLong. The visible
        text streams to on_text as it becomes safe to show; `cancelled()` is asked after each token (a client that
        went away); `stop` adds stop words for this answer; `switches` sets the template's variables for it (the
        API's chat_template_kwargs: enable_thinking)."""
        template = self.template.with_defaults(**switches) if switches else self.template
        self.check_could_fit(messages, sampling)
        ids = self.prompt_ids(messages, template)
        self.check_fits(len(ids), sampling)
        stream = StopWordStream(self.tokenizer, self.stop_words + [w for w in stop if w], self.eos_ids, on_text,
                                cancelled, hide_reasoning=template.thinking_off())
        config = self.generation_config(sampling)
        # generate()'s own processor list for these settings (a private method: see tests/test_upstream.py).
        processors = self.model._get_logits_processor(config, input_ids_seq_length=len(ids), device=self.model.device)
        row = Row(ids, sampling.max_new_tokens, frozenset(self.eos_ids), stream.should_stop, processors,
                  greedy=not config.do_sample, seed=sampling.seed)
        return Answering(row, stream)

    def decoder(self, adapter: bool = True) -> Decoder:
        """A decoder of this model: with its PEFT adapter (as loaded), or as its base (adapter=False)."""
        return Decoder(self.model, lambda: adapter_switch(self.model, adapter), self.fast if adapter else None,
                       self.prompts.get(adapter))

    def generate(self, messages: list[dict], sampling: Sampling, on_text: Callable[[str], None] = lambda text: None,
                 cancelled: Callable[[], bool] = lambda: False, stop: list[str] = (), adapter: bool = True) -> Completion:
        """Answer the conversation alone (see `start`); adapter=False answers as the base, with the PEFT adapter
        switched off. Ctrl-C ends the answer early with what was shown."""
        answering = self.start(messages, sampling, on_text, cancelled, stop)
        try:
            self.decoder(adapter).run(answering.row)
        except KeyboardInterrupt:
            return answering.completion(interrupted=True)
        return answering.completion()

    def generate_many(self, conversations: list[list[dict]], sampling: Sampling, adapter: bool = True,
                      max_batch: int = 8, on_done: Callable[[], None] = lambda: None) -> list[Completion]:
        """Answer each conversation (see `start`), up to `max_batch` of them decoding together (one forward a step
        for all; the next joins as soon as one ends): eval's answers,
        a group of completions per prompt. Greedy answers are those `generate` gives alone (float32; bfloat16 may
        round differently in a batch). on_done() is called as each answer ends (a progress bar)."""
        answering = [self.start(messages, sampling) for messages in conversations]
        for _ in self.decoder(adapter).run_all([a.row for a in answering], max_batch):
            on_done()
        return [a.completion() for a in answering]


class Answering:
    """One answer under way: the row the decoder advances, and the stream that turns its tokens into text."""

    def __init__(self, row: Row, stream: StopWordStream):
        self.row, self.stream = row, stream

    def completion(self, interrupted: bool = False) -> Completion:
        """The answer once its row has ended (or been interrupted: what was shown so far)."""
        row, stream = self.row, self.stream
        if not interrupted:
            stream.finish()
        if interrupted:
            ended_by = "interrupted"
        elif stream.stopped:
            ended_by = "stop_word"
        elif stream.was_cancelled:
            ended_by = "cancelled"
        else:
            ended_by = "eos" if row.ended == "eos" else "length"
        return Completion(stream.answer, len(row.prompt), len(row.answer), ended_by)
