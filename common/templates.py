"""Prompt templates: one interface, two implementations, and the one place that turns turns (common/conversation.py)
into tokens + labels.

- `TableTemplate`: an entry of XTuner's PROMPT_TEMPLATE table (data, in prompt_templates.json), encoded as XTuner's
  `template_map_fn` + `encode_fn` encode it, token for token.
- `TokenizerTemplate` (the name `tokenizer`): the tokenizer's own Jinja chat template; the loss mask is derived by
  rendering growing prefixes of the conversation.

Everything else (data, chat, evaluation, export) holds a `Template` and calls its methods; nothing outside this
module asks which kind it has.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from common.cli import UserError, did_you_mean
from common.conversation import Turn, turns_to_messages

IGNORE = -100
Segment = tuple[list[int], list[int]]  # one turn's (input_ids, labels)


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


# ---------------------------------------------------------------- the tokenizer's own chat template

class TokenizerTemplate(Template):
    name = "tokenizer"
    has_system = True  # whatever the Jinja does with it is the tokenizer author's choice

    def chat_template(self, tokenizer) -> str | None:
        return getattr(tokenizer, "chat_template", None)

    @staticmethod
    def _render(tokenizer, messages, generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja raises whatever the template author chose (often TemplateError)
            raise UserError(f"the tokenizer's chat template cannot render this conversation: {e}") from None

    def encode(self, tokenizer, turns: list[Turn]) -> list[Segment]:
        if not turns:
            return []
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("template `tokenizer` needs a tokenizer with a chat_template; name a template instead")
        # Render growing prefixes: the text a turn adds after its generation prompt is its answer. Each render
        # must extend the previous one, or the template rewrites history and no mask can be derived.
        turn_starts, spans, text = [], [], ""
        for k, turn in enumerate(turns):
            upto = turns_to_messages(turns[: k + 1])
            turn_starts.append(len(text))
            prompt = self._render(tokenizer, upto if turn.output is None else upto[:-1], True)
            if not prompt.startswith(text):
                raise UserError(f"the tokenizer's chat template does not render turn {k + 1} as an extension of the earlier turns")
            text = prompt
            if turn.output is None:
                break
            full = self._render(tokenizer, upto, False)
            if not full.startswith(prompt):
                raise UserError(f"the tokenizer's chat template renders turn {k + 1}'s answer so that the prompt is not its prefix")
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


TEMPLATES, SYSTEM_TEMPLATES = _load_table()
TOKENIZER = TokenizerTemplate()
NAMES = [*TEMPLATES, TOKENIZER.name]  # every name a recipe or --prompt-template may use


def get_template(name: str) -> Template:
    if name == TOKENIZER.name:
        return TOKENIZER
    if name not in TEMPLATES:
        raise UserError(f"unknown template `{name}`{did_you_mean(name, NAMES)}")
    return TEMPLATES[name]


def system_from_template(name: str, bot_name: str) -> str:
    """A system prompt from XTuner's SYSTEM_TEMPLATE table, with {bot_name} filled in."""
    if name not in SYSTEM_TEMPLATES:
        raise UserError(f"unknown system template `{name}`{did_you_mean(name, SYSTEM_TEMPLATES)}; "
                        f"known: {', '.join(SYSTEM_TEMPLATES)}")
    return SYSTEM_TEMPLATES[name].format(bot_name=bot_name)
