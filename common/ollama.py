"""Ollama's Modelfile from the training template: the template's turn shape read off its Jinja rendering, written
as an Ollama TEMPLATE (Go template syntax), and a renderer for exactly the Go-template subset written here, so the
TEMPLATE can be proved to render the training text before anyone runs Ollama.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

from common.cli import UserError

HEADER = "# Ollama: ollama create NAME -f Modelfile   (written by merge.py --gguf from the training template)"
# Marker contents: no spaces or punctuation a template might strip or escape.
S, U1, A1, U2, A2 = "SYSTEMmark0", "USERmark1", "ASSISTANTmark1", "USERmark2", "ASSISTANTmark2"


@dataclass(frozen=True)
class TurnShape:
    """The text around each message, as the template renders a conversation."""

    head_system: str  # before the system prompt
    after_system: str  # between the system prompt and the first user message
    head: str  # before the first user message when there is no system prompt (a default system block, BOS...)
    user_prefix: str  # before each later user message
    after_user: str  # after each user message: its end and the assistant's start, i.e. the generation prompt
    after_assistant: str  # after each answer


def _between(text: str, marks: list[str]) -> list[str]:
    pieces, pos = [], 0
    for mark in marks:
        at = text.find(mark, pos)
        if at < 0:
            raise UserError(f"the chat template does not render message content verbatim (`{mark}` is missing)")
        pieces.append(text[pos:at])
        pos = at + len(mark)
    return pieces + [text[pos:]]


def turn_shape(render: Callable[[list[dict], bool], str]) -> TurnShape:
    """Read the shape off renders of marker conversations; render(messages, add_generation_prompt) -> text."""
    conv = [{"role": "user", "content": U1}, {"role": "assistant", "content": A1},
            {"role": "user", "content": U2}, {"role": "assistant", "content": A2}]
    head_system, after_system, after_user, between, _, after_assistant = _between(
        render([{"role": "system", "content": S}] + conv, False), [S, U1, A1, U2, A2])
    head = _between(render(conv[:2], False), [U1, A1])[0]
    if not between.startswith(after_assistant):
        raise UserError("the chat template ends an answer differently inside a conversation than at its end")
    return TurnShape(head_system, after_system, head, between[len(after_assistant):], after_user, after_assistant)


def _go_literal(text: str) -> str:
    """Template text as it stands, or as a Go string literal when it holds template delimiters."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if "{{" in text or "}}" in text else text


def go_template(shape: TurnShape) -> str:
    """An Ollama TEMPLATE. No `{{-` trimming: the literal pieces are whitespace-exact, so nothing may eat into them."""
    return (
        "{{ if .System }}" + _go_literal(shape.head_system) + "{{ .System }}" + _go_literal(shape.after_system)
        + "{{ else }}" + _go_literal(shape.head) + "{{ end }}"
        + "{{ $first := true }}{{ range .Messages }}"
        + '{{ if eq .Role "user" }}{{ if not $first }}' + _go_literal(shape.user_prefix) + "{{ end }}{{ $first = false }}"
        + "{{ .Content }}" + _go_literal(shape.after_user)
        + '{{ else if eq .Role "assistant" }}{{ .Content }}' + _go_literal(shape.after_assistant)
        + "{{ end }}{{ end }}"
    )


# ---------------------------------------------------------------- a renderer for the subset go_template() writes

_ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)


class _Parser:
    """Nested nodes: ("text", s) | ("expr", e) | ("if", cond, then, else) | ("range", body) | ("set", name, bool)."""

    def __init__(self, template: str):
        self.tokens, pos = [], 0
        for m in _ACTION.finditer(template):
            self.tokens += [("text", template[pos:m.start()]), ("action", m.group(1).strip())]
            pos = m.end()
        self.tokens.append(("text", template[pos:]))
        self.i = 0

    def block(self, stop: tuple[str, ...] = ()) -> tuple[list, str]:
        nodes = []
        while self.i < len(self.tokens):
            kind, value = self.tokens[self.i]
            self.i += 1
            if kind == "text":
                nodes.append(("text", value))
            elif value in stop or value.startswith("else if "):
                return nodes, value
            elif value.startswith("if "):
                nodes.append(self.conditional(value[len("if "):]))
            elif value.startswith("range "):
                nodes.append(("range", self.block(("end",))[0]))
            elif ":=" in value or " = " in value:
                name, _, rhs = value.partition(":=") if ":=" in value else value.partition(" = ")
                nodes.append(("set", name.strip(), rhs.strip() == "true"))
            else:
                nodes.append(("expr", value))
        return nodes, ""

    def conditional(self, cond: str):
        then, ended = self.block(("else", "end"))
        if ended.startswith("else if "):  # `else if` ends this block and opens the next, sharing one `end`
            return ("if", cond, then, [self.conditional(ended[len("else if "):])])
        return ("if", cond, then, self.block(("end",))[0] if ended == "else" else [])


def _truthy(cond: str, dot: dict, env: dict) -> bool:
    m = re.fullmatch(r'eq \.(\w+) "(.*)"', cond)
    if m:
        return dot.get(m.group(1)) == json.loads(f'"{m.group(2)}"')
    if cond.startswith("not "):
        return not _truthy(cond[len("not "):], dot, env)
    return bool(env[cond] if cond.startswith("$") else dot.get(cond.lstrip(".")))


def _value(expr: str, dot: dict, env: dict) -> str:
    if expr.startswith('"'):
        return json.loads(expr)
    return str(env[expr] if expr.startswith("$") else dot.get(expr.lstrip("."), ""))


def render_go(template: str, system: str | None, messages: list[dict]) -> str:
    """Render an Ollama TEMPLATE as Ollama would, for the subset go_template() writes."""
    env: dict = {}
    root = {"System": system or "", "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}

    def run(nodes, dot) -> str:
        out = []
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "expr":
                out.append(_value(node[1], dot, env))
            elif node[0] == "set":
                env[node[1]] = node[2]
            elif node[0] == "if":
                out.append(run(node[2] if _truthy(node[1], dot, env) else node[3], dot))
            else:  # range over .Messages
                out += [run(node[1], m) for m in root["Messages"]]
        return "".join(out)

    return run(_Parser(template).block()[0], root)


# ---------------------------------------------------------------- the Modelfile

def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise UserError(f"the {what} contains \"\"\", which a Modelfile cannot quote")
    return f'"""{text}"""'


def modelfile(gguf_name: str, template: str, system: str | None, stops: list[str], sampling: dict) -> str:
    lines = [HEADER,
             f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(template, 'template')}"]
    if system:
        lines.append(f"SYSTEM {_quoted(system, 'system prompt')}")
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops]
    lines += [f"PARAMETER {key} {value}" for key, value in sampling.items()]
    return "\n".join(lines) + "\n"


def write_modelfile(out_dir, gguf_name: str, template, tokenizer, system: str | None, evaluation, num_ctx: int):
    """OUT/Modelfile for the GGUF: the training template as a TEMPLATE (checked against the Jinja rendering on a
    multi-turn conversation, with and without a system prompt), the run's system prompt, one stop per stop word of
    the template, and the run's sampling defaults. Returns its path."""
    from pathlib import Path

    from common.artifacts import MODELFILE, write_text

    jinja = template.chat_template(tokenizer)

    def render(messages, generation_prompt):
        return tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    go = go_template(turn_shape(render))
    check = [{"role": "user", "content": "我最近总是失眠"}, {"role": "assistant", "content": "能说说通常几点睡吗？"},
             {"role": "user", "content": "一般凌晨两点"}, {"role": "assistant", "content": "我们先固定起床时间。"},
             {"role": "user", "content": "好的"}]  # three rounds: a round counter shows by the third
    for sys_prompt in (None, system or "你是一位心理咨询师。"):
        messages = ([{"role": "system", "content": sys_prompt}] if sys_prompt else []) + check
        if render_go(go, sys_prompt, check) != render(messages, True):
            raise UserError(f"template `{template.name}` does not have a turn shape an Ollama TEMPLATE can express "
                            "(e.g. a round counter); the GGUF carries its Jinja chat template")
    sampling = {"temperature": evaluation.temperature, "top_p": evaluation.top_p, "top_k": evaluation.top_k,
                "num_predict": evaluation.max_new_tokens, "repeat_penalty": 1.0, "num_ctx": num_ctx}
    path = Path(out_dir) / MODELFILE
    write_text(path, modelfile(gguf_name, go, system, template.stop_words(tokenizer), sampling))
    return path
