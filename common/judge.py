"""A rubric judge: a model behind any OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp's server, a cloud API, our
own `chat.py --serve`) scores a reply on a rubric's dimensions. Used by the `judge` reward (common/rewards.py) and by
eval.py.

- The rubric is a JSON file (data/counselling_rubric.json): a scale, instructions, and dimensions each with a
  description and anchored scores. The judge is asked for one JSON object, a score per dimension and a reason.
- Requests: at most `max_in_flight` at once, each with a timeout, retried on a refused connection, a timeout or a 5xx
  (after 0.5 s, 1 s, 2 s...). The key comes from a file or an environment variable, never from the recipe.
- Every verdict the judge gave is kept on disk (`cache`, one JSONL file per rubric and judge model, keyed by the
  prompt and the answer): a rerun or a resumed run asks nothing twice. Failed requests are not kept, so a rerun asks
  them again.
- A reply that does not hold the expected scores, or a request that failed after its retries, gives no score (None:
  TRL leaves it out) and is counted and logged; it never ends the run. `summary()` says how many were lost.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from common.cli import UserError, first_line, read_json, reading

LOGGED_PER_KIND = 5  # lost verdicts logged one by one per kind (unparsed, failed); the rest are counted


@dataclass(frozen=True)
class Dimension:
    name: str
    description: str
    anchors: dict  # score (as text) -> what that score looks like


@dataclass(frozen=True)
class Rubric:
    name: str
    instructions: str
    low: int
    high: int
    dimensions: tuple
    digest: str  # of the file's content: a changed rubric is a new cache

    def system_prompt(self) -> str:
        lines = [self.instructions, "", f"Dimensions (each scored {self.low}-{self.high}):"]
        for d in self.dimensions:
            anchors = "; ".join(f"{k} = {v}" for k, v in sorted(d.anchors.items(), key=lambda kv: int(kv[0])))
            lines.append(f"- {d.name}: {d.description} ({anchors})")
        example = ", ".join(f'"{d.name}": {self.low}' for d in self.dimensions)
        lines += ["", "Answer with one JSON object and nothing else, with an integer score for every dimension and a "
                      f'short reason, e.g. {{{example}, "reason": "..."}}']
        return "\n".join(lines)

    def parse(self, reply: str) -> Optional[dict]:
        """The scores in the judge's reply: the last JSON object in it that scores every dimension within the scale
        (models wrap it in prose or a code fence); None when there is none."""
        for match in reversed(list(re.finditer(r"\{[^{}]*\}", reply or ""))):
            try:
                data = json.loads(match.group(0))
            except ValueError:
                continue
            scores = {d.name: data.get(d.name) for d in self.dimensions} if isinstance(data, dict) else {}
            if scores and all(isinstance(v, (int, float)) and not isinstance(v, bool) and self.low <= v <= self.high
                              for v in scores.values()):
                return {"scores": scores, "reason": str(data.get("reason", ""))}
        return None

    def normalised(self, scores: dict) -> float:
        """The mean score, 0 at the scale's bottom and 1 at its top."""
        return sum((v - self.low) / (self.high - self.low) for v in scores.values()) / len(scores)


def load_rubric(path: str) -> Rubric:
    """A rubric file, checked field by field: one line naming the file and what is wrong."""
    data = read_json(path)
    with reading(path, "not readable"):
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    scale = data.get("scale", [1, 5])
    if not (isinstance(scale, list) and len(scale) == 2 and all(isinstance(v, int) for v in scale)
            and scale[0] < scale[1]):
        raise UserError(f"{path}: `scale` should be two integers, low < high (e.g. [1, 5]), got {scale!r}")
    dims = data.get("dimensions")
    if not isinstance(dims, list) or not dims:
        raise UserError(f"{path}: `dimensions` should be a non-empty list of {{name, description, anchors}}")
    out = []
    for i, d in enumerate(dims):
        where = f"{path}: dimensions[{i}]"
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not d["name"].strip():
            raise UserError(f"{where}: expected an object with a `name`")
        if not isinstance(d.get("description"), str):
            raise UserError(f"{where} ({d['name']}): `description` should be text")
        anchors = d.get("anchors")
        if not isinstance(anchors, dict) or not anchors or not all(
                isinstance(v, str) and str(k).lstrip("-").isdigit() and scale[0] <= int(k) <= scale[1]
                for k, v in anchors.items()):
            raise UserError(f"{where} ({d['name']}): `anchors` should map scores within {scale} to descriptions, "
                            'e.g. {"1": "dismissive", "5": "warm and specific"}')
        out.append(Dimension(d["name"], d["description"], {str(k): v for k, v in anchors.items()}))
    if len({d.name for d in out}) != len(out):
        raise UserError(f"{path}: two dimensions share a name")
    instructions = data.get("instructions", "Rate the reply on each dimension.")
    if not isinstance(instructions, str):
        raise UserError(f"{path}: `instructions` should be text")
    return Rubric(str(data.get("name", Path(path).stem)), instructions, scale[0], scale[1], tuple(out), digest)


def read_key(key_file: Optional[str], key_env: Optional[str]) -> Optional[str]:
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise UserError(f"{key_file}: judge key file not found")
        with reading(path, "not readable as a key file"):
            key = path.read_text(encoding="utf-8").strip()
        if not key:
            raise UserError(f"{key_file}: the judge key file is empty")
        return key
    if key_env:
        key = os.environ.get(key_env, "").strip()
        if not key:
            raise UserError(f"judge key: environment variable {key_env} is not set")
        return key
    return None


def check_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"judge url {url!r}: expected an OpenAI-compatible base URL like http://127.0.0.1:8000/v1")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise UserError(f"judge url {url!r}: the port is not a number") from None
    return url.rstrip("/")


def transcript(prompt) -> str:
    """A prompt (a message list, or a plain string) as the judge reads it."""
    if isinstance(prompt, str):
        return f"Client: {prompt}"
    names = {"user": "Client", "assistant": "Counsellor", "system": "Counsellor's instructions"}
    return "\n".join(f"{names.get(m.get('role'), m.get('role'))}: {m.get('content') or ''}" for m in prompt)


class JudgeClient:
    """One judge endpoint and rubric, with its cache and its counts. Thread-safe."""

    def __init__(self, url: str, model: str, rubric: Rubric, key: Optional[str], max_in_flight: int = 4,
                 timeout: float = 120.0, retries: int = 2, cache: Optional[str] = None, max_tokens: int = 400,
                 log: Callable[[str], None] = print):
        self.url, self.model, self.rubric, self.key, self.max_tokens = url, model, rubric, key, max_tokens
        self.max_in_flight, self.timeout, self.retries, self.log = max_in_flight, timeout, retries, log
        self.lock = threading.Lock()
        self.counts = {"asked": 0, "cached": 0, "unparsed": 0, "failed": 0}
        self.cache_path = None
        self.cache: dict[str, dict] = {}
        if cache:
            tag = hashlib.sha256(f"{rubric.digest}\n{model}".encode()).hexdigest()[:16]
            self.cache_path = Path(cache) / f"{rubric.name}-{tag}.jsonl"
            self.cache = read_cache(self.cache_path)

    @classmethod
    def from_settings(cls, s, log: Callable[[str], None] = print) -> JudgeClient:
        """From the `judge` reward's settings (or eval.py's options): every check that can fail before a model
        loads (address, rubric, key, the endpoint answering), one line each."""
        url = check_url(s.url)
        rubric = load_rubric(s.rubric)
        key = read_key(s.api_key_file, s.api_key_env)
        if s.max_in_flight < 1 or s.timeout <= 0 or s.retries < 0 or s.max_tokens < 1:
            raise UserError("judge: max_in_flight >= 1, timeout > 0, retries >= 0 and max_tokens >= 1 expected")
        make = lambda model: cls(url, model, rubric, key, s.max_in_flight, s.timeout, s.retries, s.cache,  # noqa: E731
                                 s.max_tokens, log)
        models = make(s.model or "").list_models()
        if not s.model and not models:
            raise UserError(f"judge {url}: /models lists no model; set the judge's `model`")
        return make(s.model or models[0])

    # -- HTTP

    def _request(self, path: str, body: Optional[dict], timeout: float) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))

    def list_models(self) -> list[str]:
        try:
            data = self._request("/models", None, min(self.timeout, 10.0))
        except urllib.error.HTTPError as e:
            raise UserError(f"judge {self.url}: GET /models answered {e.code} "
                            f"({'check the key' if e.code in (401, 403) else first_line(e)})") from None
        except (OSError, ValueError) as e:
            raise UserError(f"judge {self.url}: not reachable ({first_line(e)})") from None
        return [m.get("id") for m in data.get("data", []) if isinstance(m, dict) and m.get("id")]

    def ask(self, prompt, answer: str) -> str:
        """The judge's raw reply, with retries; raises the last error when every try failed."""
        body = {"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                "messages": [{"role": "system", "content": self.rubric.system_prompt()},
                             {"role": "user", "content": f"Conversation:\n{transcript(prompt)}\n\n"
                                                         f"Reply to rate:\n{answer}"}]}
        for attempt in range(self.retries + 1):
            try:
                data = self._request("/chat/completions", body, self.timeout)
                return data["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code != 429 or attempt == self.retries:
                    raise
            except (OSError, ValueError):
                if attempt == self.retries:
                    raise
            time.sleep(0.5 * 2 ** attempt)
        raise AssertionError("unreachable")

    # -- verdicts

    def key_of(self, prompt, answer: str) -> str:
        return hashlib.sha256(json.dumps([prompt, answer], ensure_ascii=False).encode()).hexdigest()

    def verdict(self, prompt, answer: str) -> Optional[dict]:
        """{"scores": {dimension: score}, "reason": text} or None (unparsed or failed, counted and logged)."""
        key = self.key_of(prompt, answer)
        with self.lock:
            cached = self.cache.get(key)
            if cached is not None:
                self.counts["cached"] += 1
        if cached is None:
            try:
                reply = self.ask(prompt, answer)
            except Exception as e:  # noqa: BLE001 - a judge that is down or broken never ends the run
                self._lost("failed", f"request failed after {self.retries + 1} tries ({first_line(e)})")
                return None
            cached = {"key": key, "reply": reply, "verdict": self.rubric.parse(reply)}
            with self.lock:
                self.counts["asked"] += 1
                self.cache[key] = cached
                if self.cache_path is not None:
                    self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                    with open(self.cache_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(cached, ensure_ascii=False) + "\n")
        if cached["verdict"] is None:
            self._lost("unparsed", f"reply without the rubric's scores: {cached['reply'][:120]!r}")
        return cached["verdict"]

    def _lost(self, kind: str, text: str) -> None:
        with self.lock:
            self.counts[kind] += 1
            n = self.counts[kind]
        if n <= LOGGED_PER_KIND:
            self.log(f"judge: no score for a sample: {text}" + (
                f" (further {kind} samples are counted, not logged)" if n == LOGGED_PER_KIND else ""))

    def verdicts(self, prompts: list, answers: list[str]) -> list[Optional[dict]]:
        with ThreadPoolExecutor(max_workers=self.max_in_flight) as pool:
            return list(pool.map(self.verdict, prompts, answers))

    def scores(self, prompts: list, answers: list[str]) -> list[Optional[float]]:
        """Each answer's mean rubric score in 0..1, None where the judge gave none."""
        return [None if v is None else self.rubric.normalised(v["scores"]) for v in self.verdicts(prompts, answers)]

    def summary(self) -> str:
        c = self.counts
        lost = c["unparsed"] + c["failed"]
        return (f"judge {self.model} at {self.url}: {c['asked']} asked, {c['cached']} from the cache, {lost} lost "
                f"({c['unparsed']} unparsed, {c['failed']} failed requests)")


def read_cache(path: Path) -> dict[str, dict]:
    """The verdicts kept so far; a line cut short by a killed run is skipped."""
    out = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
                out[row["key"]] = row
            except (ValueError, KeyError, TypeError):
                continue
    return out
