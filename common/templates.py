"""Prompt templates: one interface, two implementations, and the one place that turns turns (common/conversation.py)
into tokens + labels.

- `TableTemplate`: an entry of XTuner's PROMPT_TEMPLATE table (data, in prompt_templates.json), encoded as XTuner's
  `template_map_fn` + `encode_fn` encode it, token for token.
- `JinjaTemplate`: a Jinja chat template, the tokenizer's own (the name `tokenizer`) or a named family's
  (common/chat_templates/: qwen3, qwen3_nothink, llama3, gemma3, mistral_nemo); the loss mask is derived by rendering
  growing prefixes of the conversation, or, for a template that rewrites history, per turn as inference sees it.

Everything else (data, chat, evaluation, export) holds a `Template` and calls its methods; nothing outside this
module asks which kind it has.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from common.cli import UserError, did_you_mean
from common.conversation import Turn, drop_reasoning, turns_to_messages

IGNORE = -100
Segment = tuple[list[int], list[int]]  # one turn's (input_ids, labels)


@dataclass
class View:
    """One training sample's conversation and its segments. `rewritten`: the template rewrites history, so the sample
    is the last turn alone as inference sees it (its history re-encoded, untrained), in two segments: prompt, answer."""
    turns: list[Turn]
    segments: list[Segment]
    rewritten: bool = False


class Template:
    """What every template offers. `encode` is the only way turns become tokens, for training, chat and export."""

    name: str
    has_system: bool  # False: the template has no place for a system prompt (it is dropped)

    def encode(self, tokenizer, turns: list[Turn]) -> list[Segment]:
        """Per turn: (input_ids, labels). Concatenated, they are the training sequence (or, when the last turn has
        no output, the prompt to generate from)."""
        raise NotImplementedError

    def encode_ids(self, tokenizer, turns: list[Turn]) -> tuple[list[int], list[int]]:
        ids, labels = [], []
        for seg_ids, seg_labels in self.encode(tokenizer, turns):
            ids += seg_ids
            labels += seg_labels
        return ids, labels

    def own_stop_words(self) -> tuple[str, ...]:
        return ()

    def encode_as_seen(self, tokenizer, turns: list[Turn]) -> list[Segment]:
        """The last turn as inference sees it: the prompt the template renders with that turn last (earlier turns as
        untrained context), then its answer and end-of-turn when it has one."""
        return self.encode(tokenizer, _context(turns[:-1]) + turns[-1:])

    def prompt_ids(self, tokenizer, turns: list[Turn]) -> list[int]:
        """The token ids inference generates the last turn's answer from (its output, if any, ignored): what chat,
        the server and GRPO's prompts encode."""
        last = turns[-1]
        return self.encode_ids(tokenizer, turns[:-1] + [Turn(last.input, None, last.system)])[0]

    def thinking_off(self) -> bool:
        """Whether the template renders with thinking switched off (replies then never show a think block)."""
        return False

    def with_defaults(self, **defaults) -> "Template":
        """The template with render variables set (thinking off); a template without such switches is itself."""
        return self

    def views(self, tokenizer, turns: list[Turn]) -> list["View"]:
        """The samples training makes of a conversation: the whole conversation, or, for a template that rewrites
        history, one per trained turn as inference sees it (`View.rewritten`)."""
        return [View(turns, self.encode(tokenizer, turns))]

    def stop_words(self, tokenizer) -> list[str]:
        """Text that ends an answer: the template's stop words and the tokenizer's EOS."""
        words = list(self.own_stop_words())
        if tokenizer.eos_token and tokenizer.eos_token not in words:
            words.append(tokenizer.eos_token)
        return words

    def chat_template(self, tokenizer) -> str | None:
        """The Jinja chat template that renders exactly what `encode` encodes (saved with the tokenizer)."""
        raise NotImplementedError

    def notes(self, tokenizer, conversations: list[list[Turn]]) -> list[str]:
        """Things worth telling the user about this template on this tokenizer and data."""
        return []

    def pieces(self, turns: list[Turn]) -> list[str]:
        """The texts `encode` tokenizes one by one for these turns: data preparation tokenizes many conversations'
        pieces in one batched call ahead (`preencoded`). Empty: nothing to batch ahead."""
        return []


# ---------------------------------------------------------------- XTuner's table

class EncodeCache:
    """Token ids of text pieces, the least recently used dropped beyond a budget. Pieces repeat a lot (templates,
    system prompts, SEP, a chat's earlier turns): caching makes re-encoding windows cheap. The budget counts
    characters plus ids, so that distinct prompts (a server's, refused ones too) cannot grow memory without bound,
    as a cache bounded only by its number of entries did (200,000 entries of any size)."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.entries: OrderedDict[tuple[object, str], tuple[int, ...]] = OrderedDict()
        self.lock = threading.Lock()  # the server's worker and its event loop may both encode
        self.local = threading.local()  # pieces encoded ahead by this thread (`preencoded`), outside the budget

    @contextmanager
    def preencoded(self, tokenizer, texts: list[str]):
        """Within the block, `encode` answers these texts from one batched tokenizer call (a batch of conversations'
        pieces: one call instead of thousands, and no eviction of the pieces others repeat)."""
        unique = list(dict.fromkeys(texts))
        ids = tokenizer(unique, add_special_tokens=False)["input_ids"] if unique else []
        self.local.ahead = (tokenizer, {text: tuple(i) for text, i in zip(unique, ids)})
        try:
            yield
        finally:
            self.local.ahead = None

    def encode(self, tokenizer, text: str) -> tuple[int, ...]:
        ahead = getattr(self.local, "ahead", None)
        if ahead is not None and ahead[0] is tokenizer and text in ahead[1]:
            return ahead[1][text]
        key = (tokenizer, text)  # the object, not its id: an id may be reused once a tokenizer is freed
        with self.lock:
            ids = self.entries.get(key)
            if ids is not None:
                self.entries.move_to_end(key)
                return ids
        ids = tuple(tokenizer.encode(text, add_special_tokens=False))
        cost = len(text) + len(ids)
        if cost > self.budget // 8:  # a piece this big is rarely seen twice: it would only push the others out
            return ids
        with self.lock:
            if key not in self.entries:
                self.entries[key] = ids
                self.used += cost
            while self.used > self.budget:
                (_, old_text), old_ids = self.entries.popitem(last=False)
                self.used -= len(old_text) + len(old_ids)
        return ids


# About 1M characters + ids: tens of MB at most, and room for a large dataset's repeated pieces.
_ENCODE_CACHE = EncodeCache(budget=1 << 20)
preencoded = _ENCODE_CACHE.preencoded


def _encode_text(tokenizer, text: str) -> tuple[int, ...]:
    return _ENCODE_CACHE.encode(tokenizer, text)


@dataclass(frozen=True)
class TableTemplate(Template):
    name: str
    instruction: str
    system: Optional[str] = None  # None: the template has no place for a system prompt
    suffix: str = ""
    suffix_as_eos: bool = False
    sep: str = ""
    stop_word_list: tuple[str, ...] = ()

    @property
    def has_system(self) -> bool:
        return self.system is not None

    def own_stop_words(self) -> tuple[str, ...]:
        return self.stop_word_list

    def prompt(self, input: str, round: int, system: Optional[str] = None) -> str:
        text = self.instruction.format(input=input, round=round)
        if system and self.system is not None:
            text = self.system.format(system=system) + text
        return text

    def pieces(self, turns: list[Turn]) -> list[str]:
        texts = [self.sep] if self.sep else []
        for i, turn in enumerate(turns, start=1):
            texts.append(self.prompt(turn.input, i, turn.system))
            if turn.output is not None:
                texts.append(turn.output + self.suffix)
        return texts

    def encode(self, tokenizer, turns: list[Turn]) -> list[Segment]:
        # XTuner: BOS before the first turn and after every turn that ended with EOS; no BOS if the tokenizer has none.
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        eos = [] if self.suffix_as_eos else [tokenizer.eos_token_id]
        if None in eos:
            raise UserError(f"template `{self.name}` appends EOS, but the tokenizer has no eos_token")
        segments, needs_bos = [], True
        for i, turn in enumerate(turns, start=1):
            prompt = list(_encode_text(tokenizer, self.prompt(turn.input, i, turn.system)))
            ids = (bos if needs_bos else []) + prompt
            labels = [IGNORE] * len(ids)
            if turn.output is not None:
                answer = list(_encode_text(tokenizer, turn.output + self.suffix)) + eos
                sep = list(_encode_text(tokenizer, self.sep)) if self.sep else []
                ids += answer + sep
                labels += (answer if turn.train else [IGNORE] * len(answer)) + [IGNORE] * len(sep)
                needs_bos = bool(eos)
            segments.append((ids, labels))
        return segments

    def chat_template(self, tokenizer=None) -> str:
        """Jinja that renders exactly what `encode` encodes (BOS/EOS as the tokenizer's tokens)."""
        system = _format_jinja(self.system, system="ns.system") if self.system else ""
        instruction = _format_jinja(self.instruction, input="message['content']", round="ns.round")
        eos = "" if self.suffix_as_eos else "{{ eos_token }}{%- set ns.bos = true -%}"
        return (
            "{%- set ns = namespace(system='', round=0, bos=true) -%}"
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] -%}"
            "{%- elif message['role'] == 'user' -%}"
            "{%- if ns.bos and bos_token -%}{{ bos_token }}{%- endif -%}{%- set ns.bos = false -%}"
            "{%- set ns.round = ns.round + 1 -%}"
            + ("{%- if ns.system -%}" + system + "{%- endif -%}" if system else "")
            + "{%- set ns.system = '' -%}"
            + instruction
            + "{%- elif message['role'] == 'assistant' -%}{{ message['content'] }}"
            + (_jinja_literal(self.suffix) if self.suffix else "")
            + eos
            + (_jinja_literal(self.sep) if self.sep else "")
            + "{%- endif -%}{%- endfor -%}"
        )

    def notes(self, tokenizer, conversations: list[list[Turn]]) -> list[str]:
        notes = []
        bos = tokenizer.bos_token
        if bos and tokenizer.bos_token_id is not None and self.prompt("", 1, "x").startswith(bos):
            notes.append(f"the tokenizer's BOS token {bos} also starts template `{self.name}`, and XTuner's encoding "
                         f"prepends BOS: samples start with it twice (use `template: tokenizer` for this model)")
        if self.system is None and any(t.system for c in conversations for t in c):
            notes.append(f"template `{self.name}` has no system format: system prompts in the data are ignored")
        return notes


def _jinja_literal(text: str) -> str:
    return "{{ " + json.dumps(text) + " }}"


def _format_jinja(fmt: str, **variables: str) -> str:
    """Turn a str.format template into Jinja: literals as string constants, {name} as expressions."""
    import string

    out = []
    for literal, field, _, _ in string.Formatter().parse(fmt):
        if literal:
            out.append(_jinja_literal(literal))
        if field is not None:
            out.append("{{ " + variables[field] + " }}")
    return "".join(out)


# ---------------------------------------------------------------- Jinja chat templates: the tokenizer's own, or ours

@dataclass(frozen=True)
class JinjaTemplate(Template):
    """A Jinja chat template: the tokenizer's own (the name `tokenizer`) or one of the named family templates kept as
    data in common/chat_templates/. The loss mask comes from rendering growing prefixes of the conversation. Some
    templates rewrite history (Qwen3 shows reasoning only in answers after the last user message; Mistral moves the
    system prompt into the last user message): growing prefixes then do not extend each other, and each trained turn
    becomes a sample of its own, as inference sees it (`encode_as_seen`); `views` says which."""

    name: str
    jinja: Optional[str] = None  # None: the tokenizer's own chat template
    defaults: tuple[tuple[str, object], ...] = ()  # render variables (enable_thinking: false), also in the saved Jinja
    stop_word_list: tuple[str, ...] = ()
    has_system = True  # whatever the Jinja does with it is the template author's choice

    def own_stop_words(self) -> tuple[str, ...]:
        return self.stop_word_list

    def with_defaults(self, **defaults) -> "JinjaTemplate":
        if not defaults:
            return self
        merged = {**dict(self.defaults), **defaults}
        return replace(self, defaults=tuple(sorted(merged.items())))

    def thinking_off(self) -> bool:
        return dict(self.defaults).get("enable_thinking") is False

    def chat_template(self, tokenizer) -> str | None:
        source = self.jinja if self.jinja is not None else getattr(tokenizer, "chat_template", None)
        if source is None:
            return None
        # The defaults are written into the Jinja so that the merged tokenizer, the GGUF and the Modelfile render the
        # same choice; a caller's own value (the API's chat_template_kwargs) still wins.
        head = "".join(f"{{%- if {key} is not defined %}}{{%- set {key} = {json.dumps(value)} %}}{{%- endif %}}"
                       for key, value in self.defaults)
        return head + source

    def _render(self, tokenizer, messages, generation_prompt: bool, **switches) -> str:
        jinja = self.chat_template(tokenizer)
        if not jinja:
            raise UserError(f"template `{self.name}` needs a tokenizer with a chat_template; name a template instead")
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                 chat_template=jinja, **switches)
        except Exception as e:  # jinja raises whatever the template author chose (often TemplateError)
            raise UserError(f"the chat template of `{self.name}` cannot render this conversation: {e}") from None

    def _growing(self, tokenizer, turns: list[Turn]) -> list[Segment] | None:
        """Segments from growing prefixes, or None when a render does not extend the previous one (history
        rewritten)."""
        turn_starts, spans, text = [], [], ""
        for k, turn in enumerate(turns):
            upto = turns_to_messages(turns[: k + 1])
            turn_starts.append(len(text))
            prompt = self._render(tokenizer, upto if turn.output is None else upto[:-1], True)
            if not prompt.startswith(text):
                return None
            text = prompt
            if turn.output is None:
                break
            full = self._render(tokenizer, upto, False)
            if not full.startswith(prompt):
                return None
            # Train on the answer and its end-of-turn marker; trailing whitespace is the separator, as SEP is in XTuner.
            if turn.train:
                spans.append((len(prompt), len(full.rstrip())))
            text = full
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [IGNORE] * len(ids)
        span = 0  # spans and token offsets both ascend: one pass
        for n, (start, _) in enumerate(offsets):
            while span < len(spans) and spans[span][1] <= start:
                span += 1
            if span < len(spans) and spans[span][0] <= start:
                labels[n] = ids[n]
        # Split into per-turn segments at the first token of each turn's text.
        cuts, t = [], 0
        for n, (start, _) in enumerate(offsets):
            while t < len(turn_starts) and start >= turn_starts[t]:
                cuts.append(n)
                t += 1
        cuts = [0] + cuts[1:] + [len(ids)]
        return [(ids[a:b], labels[a:b]) for a, b in zip(cuts, cuts[1:])]

    def _answer_text(self, tokenizer, messages: list[dict], prompt: str) -> str | None:
        """The last answer and its end-of-turn as the template writes it after `prompt`: in the whole conversation when
        the prompt is a prefix of it, else in a conversation of that turn alone (Mistral's whole render has no place
        for a system prompt, which it writes only into the last user message)."""
        full = self._render(tokenizer, messages, False)
        if full.startswith(prompt):
            return full[len(prompt):].rstrip()
        alone = [m for m in messages[-2:] if m["role"] != "system"]
        prompt_alone, full_alone = self._render(tokenizer, alone[:-1], True), self._render(tokenizer, alone, False)
        return full_alone[len(prompt_alone):].rstrip() if full_alone.startswith(prompt_alone) else None

    def encode_as_seen(self, tokenizer, turns: list[Turn]) -> list[Segment]:
        messages = turns_to_messages(turns)
        last = turns[-1]
        prompt = self._render(tokenizer, messages if last.output is None else messages[:-1], True)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        segments = [(ids, [IGNORE] * len(ids))]
        if last.output is not None:
            answer = self._answer_text(tokenizer, messages, prompt)
            if answer is None:
                raise UserError(f"the chat template of `{self.name}` renders turn {len(turns)}'s answer so that its "
                                f"prompt is not its prefix, even with that turn alone: no loss mask can be derived")
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            segments.append((answer_ids, list(answer_ids) if last.train else [IGNORE] * len(answer_ids)))
        return segments

    def encode(self, tokenizer, turns: list[Turn]) -> list[Segment]:
        if not turns:
            return []
        segments = self._growing(tokenizer, turns)
        if segments is not None:
            return segments
        # History rewritten: the last turn as inference sees it (earlier answers as context, untrained).
        return self.encode_as_seen(tokenizer, _context(turns[:-1]) + turns[-1:])

    def views(self, tokenizer, turns: list[Turn]) -> list[View]:
        segments = self._growing(tokenizer, turns) if turns else []
        if segments is not None:
            return [View(turns, segments)]
        return [View(seen, self.encode_as_seen(tokenizer, seen), rewritten=True)
                for seen in _views_per_turn(turns)]


def _context(turns: list[Turn]) -> list[Turn]:
    """Turns as untrained context."""
    return [Turn(t.input, t.output, t.system, train=False) for t in turns]


def _views_per_turn(turns: list[Turn]) -> list[list[Turn]]:
    """For each trained turn: the conversation up to it, earlier answers as context."""
    return [_context(turns[:k]) + [turn] for k, turn in enumerate(turns) if turn.train and turn.output is not None]


# ---------------------------------------------------------------- the table, and finding a template by name

def _load_table() -> tuple[dict[str, TableTemplate], dict[str, str]]:
    raw = json.loads((Path(__file__).with_name("prompt_templates.json")).read_text(encoding="utf-8"))
    keys = {"INSTRUCTION": "instruction", "SYSTEM": "system", "SUFFIX": "suffix",
            "SUFFIX_AS_EOS": "suffix_as_eos", "SEP": "sep", "STOP_WORDS": "stop_word_list"}
    templates = {
        name: TableTemplate(name=name, **{keys[k]: tuple(v) if k == "STOP_WORDS" else v for k, v in fields.items()})
        for name, fields in raw["PROMPT_TEMPLATE"].items()
    }
    return templates, raw["SYSTEM_TEMPLATE"]


def _load_families() -> dict[str, JinjaTemplate]:
    here = Path(__file__).with_name("chat_templates")
    raw = json.loads((here / "families.json").read_text(encoding="utf-8"))
    return {name: JinjaTemplate(name=name, jinja=(here / spec["jinja"]).read_text(encoding="utf-8"),
                                defaults=tuple(sorted(spec.get("defaults", {}).items())),
                                stop_word_list=tuple(spec.get("stop_words", ())))
            for name, spec in raw.items() if not name.startswith("_")}


TEMPLATES, SYSTEM_TEMPLATES = _load_table()  # XTuner's 27
FAMILIES = _load_families()  # qwen3, qwen3_nothink, llama3, gemma3, mistral_nemo (not XTuner's names)
TOKENIZER = JinjaTemplate(name="tokenizer")
NAMES = [*TEMPLATES, *FAMILIES, TOKENIZER.name]  # every name a recipe or --prompt-template may use
_BY_NAME: dict[str, Template] = {**TEMPLATES, **FAMILIES, TOKENIZER.name: TOKENIZER}

# data.thinking: what training makes of reasoning (a think block in an answer, or OpenAI's reasoning_content), and how
# the template renders the generation prompt. keep: train on it; drop: remove it, the template renders as it does by
# default (Qwen3: an empty think block before each trained answer); nothink: remove it and switch the template's
# thinking off (Qwen3's enable_thinking: false), as chat, the server and the exports then render it too. (Not `off`:
# YAML reads an unquoted off as false.)
@dataclass(frozen=True)
class Thinking:
    drops_reasoning: bool  # think blocks are removed from the answers before encoding
    switch: tuple[tuple[str, object], ...] = ()  # render variables for the template


THINKING = {"keep": Thinking(False), "drop": Thinking(True), "nothink": Thinking(True, (("enable_thinking", False),))}
THINKING_MODES = tuple(THINKING)


def get_template(name: str, thinking: str = "keep") -> Template:
    if name not in _BY_NAME:
        raise UserError(f"unknown template `{name}`{did_you_mean(name, NAMES)}")
    return _BY_NAME[name].with_defaults(**dict(THINKING[thinking].switch))


def conversation_for(turns: list[Turn], thinking: str) -> list[Turn]:
    """The conversation as data.thinking trains it (reasoning kept or removed)."""
    return drop_reasoning(turns) if THINKING[thinking].drops_reasoning else turns


def system_from_template(name: str, bot_name: str) -> str:
    """A system prompt from XTuner's SYSTEM_TEMPLATE table, with {bot_name} filled in."""
    if name not in SYSTEM_TEMPLATES:
        raise UserError(f"unknown system template `{name}`{did_you_mean(name, SYSTEM_TEMPLATES)}; "
                        f"known: {', '.join(SYSTEM_TEMPLATES)}")
    return SYSTEM_TEMPLATES[name].format(bot_name=bot_name)
