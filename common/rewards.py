"""The reward catalog of `train.method: grpo` and of eval.py's reward table: what a good counselling reply is, as
functions with TRL's reward signature (`f(prompts, completions, completion_ids=..., **kwargs) -> list[float | None]`).

The recipe's `rewards:` is a list; each entry names one reward of the catalog with its settings, and a weight:

    rewards:
      - repetition: {n: 4}          # distinct share of the reply's n-grams (1 = no n-gram repeats)
      - length: {min: 20, max: 300, unit: chars}   # 1 inside the band, falling linearly outside it
      - language: {}                # share of the reply's letters in the script of the client's last message
      - ending: {}                  # 1 when the reply ended with the template's end of turn, 0 when cut at the limit
      - referral: {words: data/crisis_words.json}  # crisis prompt: 1 if the reply refers to help, else 0
      - judge: {url: http://127.0.0.1:8000/v1, rubric: data/counselling_rubric.json}   # common/judge.py, 0..1
        weight: 0.5
      - python: my_rewards:politeness  # your own function with TRL's reward signature

Every reward returns a score in [0, 1] per completion (a `python` reward, whatever it returns), or None where it has
nothing to say: `referral` on a prompt without crisis words, `judge` on a reply it could not score. TRL leaves a None
out of the sum and out of that reward's logged mean, and logs each reward on its own (`rewards/NAME/mean`).

Text units: Chinese, Japanese and Korean characters count one each, other scripts by words, punctuation marks one
each, so a 4-gram is four characters of Chinese or four words of English. Prompts and completions come as TRL passes
them: message lists (conversational) or plain strings.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

from common.cli import UserError, read_json

# ---------------------------------------------------------------- text helpers


def completion_text(completion) -> str:
    """A completion as TRL passes it: a string, or a list of messages (the assistant's)."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))


def user_texts(prompt) -> list[str]:
    """The client's messages of a prompt (a string prompt is all client)."""
    if isinstance(prompt, str):
        return [prompt]
    return [m.get("content") or "" for m in prompt if isinstance(m, dict) and m.get("role") == "user"]


UNITS = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]|[^\W_]+|[^\w\s]")


def units(text: str) -> list[str]:
    """Words of space-separated scripts, single characters of CJK ones, punctuation: so that repetition reads alike
    in Chinese and English (eval.py's answer figures count the same units)."""
    return UNITS.findall(text)


def repeated_share(text: str, n: int) -> float:
    """Share of the text's n-grams (of units) that repeat an earlier one: 0 for no repetition, near 1 for a loop."""
    seq = units(text)
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def script(ch: str) -> Optional[str]:
    """The writing system of a letter by its Unicode name (`CJK` for Chinese characters, LATIN, CYRILLIC, HANGUL,
    HIRAGANA...); None for what is not a letter (digits, punctuation, spaces)."""
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    return name.split(" ")[0] if name else None


def script_shares(text: str) -> dict[str, float]:
    counts: dict[str, int] = {}
    for ch in text:
        s = script(ch)
        if s:
            counts[s] = counts.get(s, 0) + 1
    total = sum(counts.values())
    return {s: c / total for s, c in counts.items()} if total else {}


def main_script(text: str) -> Optional[str]:
    shares = script_shares(text)
    return max(shares, key=shares.get) if shares else None


# ---------------------------------------------------------------- the catalog: settings (the recipe's schema) + scorer

@dataclass
class Repetition:
    """Distinct share of the reply's n-grams: 1 - the share that repeats an earlier n-gram (distinct-n)."""
    n: int = 4

    def prepare(self) -> None:
        if self.n < 1:
            raise UserError(f"n: got {self.n}, expected at least 1")

    def score(self, prompt, text: str, ids) -> Optional[float]:
        return 1.0 - repeated_share(text, self.n)


@dataclass
class Length:
    """1 inside [min, max] (characters, or tokens of the completion); below, length/min; above, falling to 0 at
    twice max."""
    min: int = 20
    max: int = 400
    unit: Literal["chars", "tokens"] = "chars"

    def prepare(self) -> None:
        if not (0 <= self.min <= self.max and self.max > 0):
            raise UserError(f"min {self.min} / max {self.max}: expected 0 <= min <= max and max > 0")

    def score(self, prompt, text: str, ids) -> Optional[float]:
        size = len(ids) if self.unit == "tokens" else len(text.strip())
        if size < self.min:
            return size / self.min
        if size > self.max:
            return max(0.0, 1.0 - (size - self.max) / self.max)
        return 1.0


@dataclass
class Language:
    """Share of the reply's letters written in the main script of the client's last message (Chinese characters for
    a Chinese message, Latin letters for an English one). A prompt without letters scores None."""

    def prepare(self) -> None:  # nothing to check or load
        pass

    def score(self, prompt, text: str, ids) -> Optional[float]:
        users = user_texts(prompt)
        wanted = main_script(users[-1] if users else "")
        if wanted is None:
            return None
        return script_shares(text).get(wanted, 0.0)


@dataclass
class Ending:
    """1 when the reply ended with the template's end of turn (an EOS id or a stop word), 0 when the length limit
    cut it. Needs the completion's ids (TRL passes them; eval.py too)."""
    ended: Callable = dataclasses.field(default=None, repr=False, metadata={"internal": True})

    def prepare(self) -> None:  # the template's end of turn comes with the tokenizer (reward_functions)
        pass

    def score(self, prompt, text: str, ids) -> Optional[float]:
        return 1.0 if self.ended(ids) else 0.0


@dataclass
class Referral:
    """A prompt whose client turns hold a crisis word: 1 when the reply holds a referral word, else 0. Other prompts:
    None (nothing to learn from them). The word lists are a JSON file the user edits (data/crisis_words.json)."""
    words: str = "data/crisis_words.json"
    lists: dict = dataclasses.field(default=None, repr=False, metadata={"internal": True})

    def prepare(self) -> None:
        self.lists = load_word_lists(self.words)

    def is_crisis(self, prompt) -> bool:
        text = " ".join(user_texts(prompt)).lower()
        return any(w in text for w in self.lists["crisis"])

    def score(self, prompt, text: str, ids) -> Optional[float]:
        if not self.is_crisis(prompt):
            return None
        text = text.lower()
        return 1.0 if any(w in text for w in self.lists["referral"]) else 0.0


def load_word_lists(path: str) -> dict[str, list[str]]:
    """{"crisis": [...], "referral": [...]}: the file's per-language lists joined, lower-cased."""
    data = read_json(path)
    out = {}
    for key in ("crisis", "referral"):
        lists = data.get(key)
        if not isinstance(lists, dict) or not lists or not all(
                isinstance(v, list) and all(isinstance(w, str) and w.strip() for w in v) for v in lists.values()):
            raise UserError(f"{path}: `{key}` should map each language to a list of words, "
                            'e.g. {"zh": ["自杀"], "en": ["suicide"]}')
        out[key] = [w.strip().lower() for words in lists.values() for w in words]
    return out


@dataclass
class Judge:
    """A rubric judge's mean score, scaled to 0..1 (common/judge.py); None where it gave no usable verdict."""
    url: str = ""  # an OpenAI-compatible endpoint's base URL, e.g. http://127.0.0.1:8000/v1
    model: Optional[str] = None  # the judge model's name at that endpoint (default: the first of its /models)
    rubric: str = "data/counselling_rubric.json"
    api_key_file: Optional[str] = None  # a file holding the key (not the recipe: recipes get shared)
    api_key_env: Optional[str] = None  # or the name of an environment variable holding it
    max_in_flight: int = 4  # requests at once
    timeout: float = 120.0  # seconds per request
    retries: int = 2  # more tries after a failed request (connection refused, 5xx, timeout)
    max_tokens: int = 400  # the judge's reply: the scores and a short reason
    cache: str = "work_dirs/judge_cache"  # verdicts on disk: a rerun or resume asks nothing twice
    client: object = dataclasses.field(default=None, repr=False, metadata={"internal": True})

    def prepare(self) -> None:
        from common import judge

        self.client = judge.JudgeClient.from_settings(self)

    def score_all(self, prompts, texts) -> list[Optional[float]]:
        return self.client.scores(prompts, texts)


@dataclass
class Python:
    """Your own function, `module:function` (importable from the working directory), called with TRL's reward
    signature; what it returns is used as it is."""
    function: str = ""
    fn: Callable = dataclasses.field(default=None, repr=False, metadata={"internal": True})

    def prepare(self) -> None:
        self.fn = import_function(self.function)


def import_function(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise UserError(f"`{spec}`: expected module:function, e.g. my_rewards:politeness")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # a module beside the recipe's working directory, as `python -m` finds it
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as e:  # noqa: BLE001 - the user's module: any failure to import is theirs to see
        why = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"`{spec}`: cannot import ({type(e).__name__}: {why})") from None
    if not callable(fn):
        raise UserError(f"`{spec}`: {type(fn).__name__} is not callable")
    return fn


CATALOG = {"repetition": Repetition, "length": Length, "language": Language, "ending": Ending,
           "referral": Referral, "judge": Judge, "python": Python}
SHORTHAND = {"python": "function"}  # `python: mod:fn` sets this key from a plain string


def check(entries: list[RewardEntry], problems: list[str]) -> None:
    """What each reward needs from outside the recipe: its word list, its judge (rubric, key, an endpoint that
    answers), its importable function; one problem each. Before any model loads (train.py, eval.py)."""
    for entry in entries:
        try:
            entry.settings.prepare()  # each setting's check and what it loads: a UserError is one problem
        except UserError as e:
            problems.append(f"`rewards[{entry.position}].{entry.name}`: {e}")


def settings_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


@dataclass
class RewardEntry:
    """One entry of `rewards:`: a catalog name, its settings and its weight in the sum GRPO learns from."""
    name: str
    settings: object
    weight: float = 1.0
    position: int = 0  # in the recipe's list, for messages

    def to_dict(self) -> dict:
        values = {f.name: getattr(self.settings, f.name) for f in settings_fields(type(self.settings))}
        key = SHORTHAND.get(self.name)
        return {self.name: values[key] if key else values, "weight": self.weight}


# ---------------------------------------------------------------- reward functions for TRL

class RewardFunction:
    """A catalog entry as TRL calls it; `__name__` is what TRL logs it as (`rewards/NAME/mean`)."""

    def __init__(self, entry: RewardEntry, name: str):
        self.entry, self.__name__ = entry, name

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[Optional[float]]:
        s = self.entry.settings
        if isinstance(s, Python):
            return s.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        texts = [completion_text(c) for c in completions]
        if isinstance(s, Judge):
            scores = s.score_all(prompts, texts)
            if "log_metric" in kwargs:  # TRL's per-step metrics: the samples this judge could not score
                kwargs["log_metric"](f"rewards/{self.__name__}/lost", float(sum(v is None for v in scores)))
            return scores
        ids = completion_ids if completion_ids is not None else [None] * len(texts)
        return [s.score(p, t, i) for p, t, i in zip(prompts, texts, ids)]


def reward_functions(entries: list[RewardEntry], tokenizer, template) -> list[RewardFunction]:
    """The recipe's rewards as TRL's reward functions, named by catalog name (`length_2` for a second `length`).
    `ending` learns the template's end of turn here (its EOS ids and stop words)."""
    functions, seen = [], {}
    for entry in entries:
        if isinstance(entry.settings, Ending):
            entry.settings.ended = end_of_turn(tokenizer, template)
        seen[entry.name] = seen.get(entry.name, 0) + 1
        name = entry.name if seen[entry.name] == 1 else f"{entry.name}_{seen[entry.name]}"
        functions.append(RewardFunction(entry, name))
    return functions


def end_of_turn(tokenizer, template) -> Callable[[list[int]], bool]:
    """Whether completion ids end the turn: the last id an EOS id, or the text ending with a stop word (a table
    template's end of turn written as text)."""
    from common.generation import eos_ids

    stops = [w for w in template.stop_words(tokenizer) if w]
    eos = set(eos_ids(tokenizer, None))

    def ended(ids) -> bool:
        if not ids:
            return False
        if ids[-1] in eos:
            return True
        tail = tokenizer.decode(list(ids[-16:]), skip_special_tokens=False).rstrip()
        return any(tail.endswith(w) for w in stops)

    return ended


def summary_line(entries: list[RewardEntry]) -> str:
    def describe(e: RewardEntry) -> str:
        values = e.to_dict()[e.name]
        shown = values if isinstance(values, str) else ", ".join(f"{k}={v}" for k, v in values.items())
        return f"{e.name}({shown}) x{e.weight:g}"

    return "rewards: " + "; ".join(describe(e) for e in entries)


def lost_summary(entries: list[RewardEntry]) -> list[str]:
    """What the end of a run says about its judges: verdicts asked, cached, lost."""
    return [e.settings.client.summary() for e in entries if isinstance(e.settings, Judge) and e.settings.client]


def mean_scores(functions: list[RewardFunction], prompts, completions, completion_ids) -> dict[str, Optional[float]]:
    """Each reward's mean over the samples it scored (None scores left out, as TRL leaves them out): eval.py's table."""
    out = {}
    for fn in functions:
        scores = [s for s in fn(prompts, completions, completion_ids=completion_ids) if s is not None]
        out[fn.__name__] = round(sum(scores) / len(scores), 4) if scores else None
    return out

