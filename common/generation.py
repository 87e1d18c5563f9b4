"""Chat with a trained model: which model a path means, the session (history as messages, rendered by the training
encoder), the context budget, streamed generation that stops at stop words and EOS without ever printing them, and
the REPL around it (multi-line input, commands, plain output when piped).
"""
from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from common import rundir
from common.cli import UserError
from common.recipe import EvaluationConfig, ModelConfig, Recipe, load_recipe
from common.templates import SYSTEM_TEMPLATES, Template, Turn, encode_turns, get_template, stop_words


MAX_LENGTH_CAP = 4096  # without a recipe: max_position_embeddings can be 128k, which CPU chat never needs


# ---------------------------------------------------------------- what to load

@dataclass
class ModelSource:
    model: Path  # a full HF model directory
    adapter: Optional[Path] = None  # a PEFT adapter loaded on top of `model`
    recipe: Optional[Recipe] = None  # the run's recipe, when the model comes from one of our runs

    @property
    def tokenizer_dir(self):
        from common.merging import has_tokenizer

        # final/ holds the tokenizer saved with the chat template training used; the base may lack it
        return self.adapter if self.adapter is not None and has_tokenizer(self.adapter) else self.model


def _from_run(run: Path) -> Path:
    """A run directory means its merged model, else its final adapter (or full model)."""
    for name in (rundir.MERGED_DIR, rundir.FINAL_DIR):
        if (run / name / "config.json").is_file() or (run / name / "adapter_config.json").is_file():
            return run / name
    raise UserError(f"{run}: neither {rundir.MERGED_DIR}/ nor {rundir.FINAL_DIR}/ holds a model (has training finished?)")


def resolve_model(model: Optional[str], adapter: Optional[str]) -> ModelSource:
    """MODEL [--adapter DIR] -> what to load. No MODEL: the latest run. An adapter directory as MODEL is loaded on
    the base named in its adapter_config.json."""
    from common.merging import base_model_path, is_adapter, resolve_base

    path = Path(model) if model else _from_run(rundir.latest_run())
    if model and not path.exists():
        raise UserError(f"{path}: no such model directory")
    if path.is_dir() and (path / rundir.RECIPE_FILE).is_file() and not (path / "config.json").is_file() \
            and not is_adapter(path):
        path = _from_run(path)  # a run directory
    adapter_dir = Path(adapter) if adapter else None
    if adapter_dir is not None and not is_adapter(adapter_dir):
        raise UserError(f"--adapter {adapter_dir}: no adapter_config.json there (not a PEFT adapter directory)")
    if adapter_dir is None and is_adapter(path):
        adapter_dir, path = path, None
    if path is None:
        try:
            path = resolve_base(base_model_path(adapter_dir))
        except UserError as e:  # the base was named relative to where training ran
            raise UserError(f"{e} (named in {adapter_dir}/adapter_config.json); pass the base: "
                            f"python chat.py BASE --adapter {adapter_dir}") from None
    elif not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json (not a Hugging Face model directory)")
    recipe_file = rundir.find_recipe_file(adapter_dir) if adapter_dir else None
    recipe_file = recipe_file or rundir.find_recipe_file(path)
    return ModelSource(path, adapter_dir, run_settings(recipe_file) if recipe_file else None)


def run_settings(recipe_file: Path) -> Recipe:
    """The run's recipe, for its settings (template, system, max_length, sampling)."""
    return load_recipe(recipe_file, check_paths=False)


def load(source: ModelSource, dtype: str = "auto", bits: Optional[int] = None):
    """(model, tokenizer) ready for generation; dtype and quantization as common.modeling does them for training."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from common.modeling import load_tokenizer, quantization_config
    from common.precision import resolve

    hf_logging.disable_progress_bar()  # a chat's stderr is for the conversation

    trust = source.recipe.model.trust_remote_code if source.recipe else False
    recipe = Recipe(model=ModelConfig(path=str(source.model), tokenizer=str(source.tokenizer_dir), dtype=dtype,
                                      quantization=f"{bits}bit" if bits else None, trust_remote_code=trust))
    tokenizer = load_tokenizer(recipe)
    precision = resolve(dtype)
    if precision.warning:
        print(f"warning: {precision.warning}", file=sys.stderr)
    torch_dtype = precision.dtype
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust)
    quant = quantization_config(recipe, torch_dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    try:
        model = AutoModelForCausalLM.from_pretrained(source.model, **kwargs)
        if source.adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, source.adapter)
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        raise UserError(f"{source.adapter or source.model}: cannot load: {str(e).strip().splitlines()[0]}") from None
    return model.eval(), tokenizer


# ---------------------------------------------------------------- settings that come from the run

def default_template(source: ModelSource) -> str:
    return source.recipe.data.template if source.recipe else "tokenizer"


def default_system(source: ModelSource) -> Optional[str]:
    """The system prompt training gave records without one (data.system). Not evaluation.system: a prompt the model
    never trained under can pull a small model off course (the demo model repeats it back)."""
    return source.recipe.data.system if source.recipe else None


def sampling_defaults(source: ModelSource) -> EvaluationConfig:
    """The run's eval-preview sampling settings, else the schema's (XTuner's chat defaults)."""
    return source.recipe.evaluation if source.recipe else EvaluationConfig()


def system_from_template(name: str, bot_name: str) -> str:
    if name not in SYSTEM_TEMPLATES:
        import difflib

        near = difflib.get_close_matches(name, list(SYSTEM_TEMPLATES), n=1)
        raise UserError(f"unknown system template `{name}`" + (f" (did you mean `{near[0]}`?)" if near else "")
                        + f"; known: {', '.join(SYSTEM_TEMPLATES)}")
    return SYSTEM_TEMPLATES[name].format(bot_name=bot_name)


def max_length(source: ModelSource, model_config, override: Optional[int] = None) -> int:
    """The context the chat may use: --max-length, else the length the run trained on (data.max_length), else the
    model's max_position_embeddings capped at MAX_LENGTH_CAP."""
    if override:
        return override
    if source.recipe:
        return source.recipe.data.max_length
    return min(getattr(model_config, "max_position_embeddings", None) or MAX_LENGTH_CAP, MAX_LENGTH_CAP)


# ---------------------------------------------------------------- streaming with stop words

class StopWordStream(StoppingCriteria):
    """Decodes the answer as it grows, hands on the text that is safe to show, and stops at the first stop word.

    Used as a stopping criterion rather than a streamer because generate() asks the criteria about each new token
    before it streams it: one object both decides to stop and decides what to print. A tail that could be the start
    of a stop word (which may span several tokens), or half of a UTF-8 character, is held back until it is resolved.
    EOS ids end generation through generate() itself; they are dropped from the text here.
    """

    def __init__(self, tokenizer, prompt_length: int, stop_words: list[str], eos_ids: set[int],
                 on_text: Callable[[str], None]):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length
        self.stop_words = [w for w in stop_words if w]
        self.eos_ids, self.on_text = eos_ids, on_text
        self.text, self.shown, self.stopped, self.length, self.ended_with_eos = "", 0, False, 0, False

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        self.feed(input_ids[0, self.prompt_length:].tolist())
        return torch.full((input_ids.shape[0],), self.stopped, dtype=torch.bool, device=input_ids.device)

    def feed(self, answer_ids: list[int]) -> None:
        """All answer ids so far (not just the new one): decoding them together keeps multi-token characters whole."""
        if self.stopped:
            return
        self.length = len(answer_ids)
        self.ended_with_eos = bool(answer_ids) and answer_ids[-1] in self.eos_ids
        ids = [i for i in answer_ids if i not in self.eos_ids]
        self.text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
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


# ---------------------------------------------------------------- the session

class PromptTooLong(UserError):
    pass


@dataclass
class Reply:
    text: str
    interrupted: bool = False  # Ctrl-C: the text is what had been shown
    cut: bool = False  # ended by max-new-tokens, not by a stop word or EOS
    dropped: int = 0  # oldest turns dropped from the history to fit this prompt


@dataclass
class ChatSession:
    """A conversation kept as messages; each turn re-renders it with the template, exactly as training encodes it."""

    model: object
    tokenizer: object
    template: Template | str  # a Template, or "tokenizer" for the tokenizer's chat template
    max_length: int  # prompt + answer must fit
    max_new_tokens: int = 256
    system: Optional[str] = None
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    extra_stop_words: list[str] = field(default_factory=list)
    history: list[tuple[str, str]] = field(default_factory=list)  # (user, assistant)

    def __post_init__(self):
        if isinstance(self.template, str):
            self.template = get_template(self.template)
        if self.max_new_tokens >= self.max_length:
            raise UserError(f"--max-new-tokens {self.max_new_tokens} leaves no room for the prompt in a context of "
                            f"{self.max_length} tokens (see --max-length)")
        self.stop_words = stop_words(self.template, self.tokenizer) + [w for w in self.extra_stop_words if w]
        self.eos_ids = eos_ids(self.tokenizer, self.model)
        self.turns("")  # a template that cannot render a conversation fails now, not at the first question

    @property
    def budget(self) -> int:
        return self.max_length - self.max_new_tokens

    def reset(self) -> None:
        self.history.clear()

    def turns(self, message: str, start: int = 0) -> list[Turn]:
        # Training puts the system prompt on a conversation's first turn (and on the first turn of each `split`
        # window), so it goes on the first turn still in the history.
        turns = [Turn(user, answer) for user, answer in self.history[start:]] + [Turn(message, None)]
        turns[0].system = self.system or None
        return turns

    def prompt_ids(self, message: str) -> tuple[list[int], int]:
        """The ids to generate from, and how many of the oldest turns were dropped (for good) to fit the budget."""
        for start in range(len(self.history) + 1):
            ids, _ = encode_turns(self.tokenizer, self.template, self.turns(message, start))
            if len(ids) <= self.budget:
                del self.history[:start]
                return ids, start
        raise PromptTooLong(f"the message is {len(ids)} tokens with the template, more than the {self.budget} the "
                            f"context allows ({self.max_length} minus {self.max_new_tokens} for the answer)")

    def generation_config(self):
        config = copy.deepcopy(self.model.generation_config)
        sample = self.temperature > 0
        # Unset sampling knobs when greedy: transformers warns about flags that would have no effect.
        config.update(max_new_tokens=self.max_new_tokens, do_sample=sample,
                      temperature=self.temperature if sample else None, top_k=self.top_k if sample else None,
                      top_p=self.top_p if sample else None, repetition_penalty=self.repetition_penalty,
                      eos_token_id=sorted(self.eos_ids) or None,
                      pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                      else next(iter(self.eos_ids), None))
        return config

    def reply(self, message: str, on_text: Callable[[str], None] = lambda text: None) -> Reply:
        """Answer `message`, streaming the visible text to on_text; the exchange joins the history. Ctrl-C during
        generation ends the answer early: what was shown is kept as the answer."""
        ids, dropped = self.prompt_ids(message)
        stream = StopWordStream(self.tokenizer, len(ids), self.stop_words, self.eos_ids, on_text)
        input_ids = torch.tensor([ids], device=self.model.device)
        interrupted = False
        try:
            with torch.inference_mode():
                self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    generation_config=self.generation_config(),
                                    stopping_criteria=StoppingCriteriaList([stream]))
            stream.finish()
        except KeyboardInterrupt:
            interrupted = True
        self.history.append((message, stream.answer))
        cut = not (interrupted or stream.stopped or stream.ended_with_eos) and stream.length >= self.max_new_tokens
        return Reply(stream.answer, interrupted=interrupted, cut=cut, dropped=dropped)


def eos_ids(tokenizer, model) -> set[int]:
    """The tokenizer's EOS and every EOS the model's generation_config names (chat models often list several)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured if isinstance(configured, (list, tuple)) else [configured] if configured is not None else [])
    return ids


# ---------------------------------------------------------------- the REPL

class Console:
    """Prompts and colours in a terminal; plain text otherwise (pipes, --once)."""

    def __init__(self, interactive: bool, stream: bool):
        self.interactive, self.stream, self.pending = interactive, stream, []
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
            line = input(self._paint("1;32", prompt, True)) if self.interactive else sys.stdin.readline()
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
