"""Prompt templates (data, in prompt_templates.json) and the one function that turns turns into tokens + labels.

Named templates reproduce XTuner's `template_map_fn` + `encode_fn` token for token. `tokenizer` uses the
tokenizer's own chat template; its loss mask is derived by rendering growing prefixes of the conversation.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

from common.cli import UserError

IGNORE = -100
TOKENIZER_TEMPLATE = "tokenizer"


@dataclass(frozen=True)
class Template:
    name: str
    instruction: str
    system: Optional[str] = None  # None: the template has no place for a system prompt
    suffix: str = ""
    suffix_as_eos: bool = False
    sep: str = ""
    stop_words: tuple[str, ...] = ()

    def prompt(self, input: str, round: int, system: Optional[str] = None) -> str:
        text = self.instruction.format(input=input, round=round)
        if system and self.system is not None:
            text = self.system.format(system=system) + text
        return text


@dataclass
class Turn:
    input: str
    output: Optional[str]  # None on the last turn: encode up to the generation prompt (chat)
    system: Optional[str] = None
    train: bool = True  # False: the output is context only (openai `"loss": false`)


def _load_table() -> tuple[dict[str, Template], dict[str, str]]:
    raw = json.loads((Path(__file__).with_name("prompt_templates.json")).read_text(encoding="utf-8"))
    keys = {"INSTRUCTION": "instruction", "SYSTEM": "system", "SUFFIX": "suffix",
            "SUFFIX_AS_EOS": "suffix_as_eos", "SEP": "sep", "STOP_WORDS": "stop_words"}
    templates = {
        name: Template(name=name, **{keys[k]: tuple(v) if k == "STOP_WORDS" else v for k, v in fields.items()})
        for name, fields in raw["PROMPT_TEMPLATE"].items()
    }
    return templates, raw["SYSTEM_TEMPLATE"]


TEMPLATES, SYSTEM_TEMPLATES = _load_table()


def get_template(name: str) -> Template | str:
    """A Template, or the string `tokenizer` for the tokenizer's own chat template."""
    if name == TOKENIZER_TEMPLATE:
        return name
    if name not in TEMPLATES:
        import difflib

        near = difflib.get_close_matches(name, list(TEMPLATES), n=1)
        raise UserError(f"unknown template `{name}`" + (f" (did you mean `{near[0]}`?)" if near else ""))
    return TEMPLATES[name]


def stop_words(template: Template | str, tokenizer) -> list[str]:
    words = list(template.stop_words) if isinstance(template, Template) else []
    if tokenizer.eos_token and tokenizer.eos_token not in words:
        words.append(tokenizer.eos_token)
    return words


# ---------------------------------------------------------------- encoding

@lru_cache(maxsize=200_000)
def _encode_text(tokenizer, text: str) -> tuple[int, ...]:
    # Pieces repeat a lot (templates, system prompts, SEP): caching makes re-encoding windows cheap.
    return tuple(tokenizer.encode(text, add_special_tokens=False))


def encode_segments(tokenizer, template: Template | str, turns: list[Turn]) -> list[tuple[list[int], list[int]]]:
    """Per turn: (input_ids, labels). Concatenated, they are the training sequence."""
    if not turns:
        return []
    if template == TOKENIZER_TEMPLATE:
        return _encode_with_chat_template(tokenizer, turns)
    return _encode_with_template(tokenizer, template, turns)


def encode_turns(tokenizer, template: Template | str, turns: list[Turn]) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for seg_ids, seg_labels in encode_segments(tokenizer, template, turns):
        ids += seg_ids
        labels += seg_labels
    return ids, labels


def _encode_with_template(tokenizer, template: Template, turns: list[Turn]):
    # XTuner: BOS before the first turn and after every turn that ended with EOS; no BOS if the tokenizer has none.
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    eos = [] if template.suffix_as_eos else [tokenizer.eos_token_id]
    if None in eos:
        raise UserError(f"template `{template.name}` appends EOS, but the tokenizer has no eos_token")
    segments, needs_bos = [], True
    for i, turn in enumerate(turns, start=1):
        prompt = list(_encode_text(tokenizer, template.prompt(turn.input, i, turn.system)))
        ids = (bos if needs_bos else []) + prompt
        labels = [IGNORE] * len(ids)
        if turn.output is not None:
            answer = list(_encode_text(tokenizer, turn.output + template.suffix)) + eos
            sep = list(_encode_text(tokenizer, template.sep)) if template.sep else []
            ids += answer + sep
            labels += (answer if turn.train else [IGNORE] * len(answer)) + [IGNORE] * len(sep)
            needs_bos = bool(eos)
        segments.append((ids, labels))
    return segments


def chat_messages(turns: list[Turn]) -> list[dict]:
    messages = []
    for turn in turns:
        if turn.system:
            messages.append({"role": "system", "content": turn.system})
        messages.append({"role": "user", "content": turn.input})
        if turn.output is not None:
            messages.append({"role": "assistant", "content": turn.output})
    return messages


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja raises whatever the template author chose (often TemplateError)
        raise UserError(f"the tokenizer's chat template cannot render this conversation: {e}") from None


def _encode_with_chat_template(tokenizer, turns: list[Turn]):
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("template `tokenizer` needs a tokenizer with a chat_template; name a template instead")
    # Render growing prefixes: the text a turn adds after its generation prompt is its answer. Each render
    # must extend the previous one, or the template rewrites history and no mask can be derived.
    turn_starts, spans, text = [], [], ""
    for k, turn in enumerate(turns):
        upto = chat_messages(turns[: k + 1])
        turn_starts.append(len(text))
        if turn.output is None:
            upto_prompt = upto
        else:
            upto_prompt = upto[:-1]
        prompt = _render(tokenizer, upto_prompt, True)
        if not prompt.startswith(text):
            raise UserError(f"the tokenizer's chat template does not render turn {k + 1} as an extension of the earlier turns")
        text = prompt
        if turn.output is None:
            break
        full = _render(tokenizer, upto, False)
        if not full.startswith(prompt):
            raise UserError(f"the tokenizer's chat template renders turn {k + 1}'s answer so that the prompt is not its prefix")
        # Train on the answer and its end-of-turn marker; trailing whitespace is the separator, as SEP is in XTuner.
        if turn.train:
            spans.append((len(prompt), len(full.rstrip())))
        text = full
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    for n, (start, _) in enumerate(offsets):
        if any(s <= start < e for s, e in spans):
            labels[n] = ids[n]
    # Split into per-turn segments at the first token of each turn's text.
    cuts, t = [], 0
    for n, (start, _) in enumerate(offsets):
        while t < len(turn_starts) and start >= turn_starts[t]:
            cuts.append(n)
            t += 1
    cuts = [0] + cuts[1:] + [len(ids)]
    return [(ids[a:b], labels[a:b]) for a, b in zip(cuts, cuts[1:])]


# ---------------------------------------------------------------- chat template export

def _lit(text: str) -> str:
    return "{{ " + json.dumps(text) + " }}"


def _format_jinja(fmt: str, **variables: str) -> str:
    """Turn a str.format template into Jinja: literals as string constants, {name} as expressions."""
    import string

    out = []
    for literal, field, _, _ in string.Formatter().parse(fmt):
        if literal:
            out.append(_lit(literal))
        if field is not None:
            out.append("{{ " + variables[field] + " }}")
    return "".join(out)


def to_jinja(template: Template) -> str:
    """A Jinja chat_template that renders exactly what encode_turns encodes (BOS/EOS as the tokenizer's tokens)."""
    system = _format_jinja(template.system, system="ns.system") if template.system else ""
    instruction = _format_jinja(template.instruction, input="message['content']", round="ns.round")
    eos = "" if template.suffix_as_eos else "{{ eos_token }}{%- set ns.bos = true -%}"
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
        + (_lit(template.suffix) if template.suffix else "")
        + eos
        + (_lit(template.sep) if template.sep else "")
        + "{%- endif -%}{%- endfor -%}"
    )
