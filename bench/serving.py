"""Serving: aggregate completion tokens/s of `chat.py --serve` (the demo's base model, float32, greedy, up to 64 new
tokens per request) at 1, 2, 4 and 8 concurrent clients, against one client's requests one after another on the
same server (the baseline, measured again before each level: a change of the machine's load falls on both). The
server decodes through the compiled decode step (common/decode_step.py: the lone package for one answer, the batch
package for several), built before the servers start; an eager server (`--eager`, the same batching) is measured
at 1 and 8 clients beside it. Time to first token (from sending the request to the first content delta) is the
median over the level's requests.

    python bench/serving.py [--quick] [--dtype float32]

Each client sends its requests one after another (streaming; `Client`: the standard library's HTTP, not the
official `openai` client, whose CPU per token would fall on the server's cores); the prompts are
the first user turns of the bench's conversations, a different one for every request of a level (the eager server
gets the compiled one's): the servers' prompt caches (`--prompt-cache`) reuse what prompts share, the template's
system prompt, and never a whole earlier request. Rounds repeat the whole sequence; figures are medians over rounds,
`seconds` and `requests` the first round's. --quick: two clients, one eager server in both roles (it builds nothing).
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.browser import stop_process  # noqa: E402
from bench.training import MODEL, data_path  # noqa: E402
from common.server import PROMPT_CACHE_MB  # noqa: E402

LEVELS = (1, 2, 4, 8)
EAGER_LEVELS = (1, 8)
REQUESTS_PER_CLIENT = 2
MAX_TOKENS = 64
ROUNDS = 3
MAX_BATCH = "8"
COMPILED, EAGER = "compiled step (--max-batch 8)", "eager (--eager --max-batch 8)"
START_TIMEOUT = 180
QUESTION_CHARS = 60
QUESTIONS = 400  # conversations to take the questions from: more than the 3 rounds' ~120 requests


class Server:
    """A chat.py --serve process on a free local port, stopped on exit from the `with` block; its stderr kept."""

    def __init__(self, dtype: str, *flags: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.argv = [sys.executable, "chat.py", str(MODEL), "--serve", "--port", str(self.port), "--torch-dtype",
                     dtype, *flags]

    def __enter__(self) -> Server:
        """Starts the process; `ready()` waits for it (so that two servers import and load at once)."""
        self.stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.stderr,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return self

    def ready(self) -> Server:
        import httpx2

        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}: {' '.join(self.argv)}")
            try:
                health = httpx2.get(f"http://127.0.0.1:{self.port}/health", timeout=2)
                if health.status_code == 200:
                    self.model = health.json()["model"]  # the served id: requests must name it
                    return self
            except httpx2.TransportError:
                time.sleep(0.2)
        raise SystemExit(f"no /health within {START_TIMEOUT} s: {' '.join(self.argv)}")

    def __exit__(self, *exc) -> None:
        stop_process(self.proc)
        self.stderr.close()

    def said(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def client(self):
        import openai

        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0,
                             timeout=600)


class Client:
    """One bench client: its own kept-alive connection, streaming requests read as server-sent events with the
    standard library. Why not the official `openai` client (the tests' and the docs' client): the bench's clients run
    on the server's own cores, and the openai client's per-chunk objects cost ~0.45 ms of CPU per streamed token
    (measured at 8 clients, 2026-12-08: 0.41-0.56 s of the bench's CPU per 1,024 tokens, against 0.06-0.15 s here);
    every slice of a core they take stalls the server's two compute threads, which wait on each other at every
    kernel, and falls on the 8-client level 8 times as densely as on the lone one. Clients elsewhere cost the
    server nothing."""

    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def ask(self, model: str, question: str, max_tokens: int) -> dict:
        """One streaming chat completion, greedy: time to the first content, completion tokens (from the usage
        chunk) and the text."""
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
                           "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}})
        sent = time.perf_counter()
        self.connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
        first, tokens, text = None, 0, []
        while line := response.readline():
            if not line.startswith(b"data: {"):
                continue  # the blank line after each event, and [DONE]
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"an error mid-stream: {chunk['error']}")
            content = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if content:
                first = first or time.perf_counter()
                text.append(content)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        return {"ttft": (first or time.perf_counter()) - sent, "tokens": tokens, "text": "".join(text)}


def level(server: Server, clients: int, questions: list[str], per_client: int, max_tokens: int) -> dict:
    """`clients` threads, each sending `per_client` requests in turn (client c asks questions[c * per_client..]);
    aggregate completion tokens/s over the wall."""
    results: list[dict] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def client_loop(c: int):
        client = Client(server.port)
        try:
            for r in range(per_client):
                question = questions[(c * per_client + r) % len(questions)]
                outcome = {**client.ask(server.model, question, max_tokens), "question": question}
                with lock:
                    results.append(outcome)
        except Exception as e:  # re-raised below: a thread's exception would otherwise only be printed
            failures.append(e)
        finally:
            client.connection.close()

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    wall = time.perf_counter() - start
    if failures or len(results) != clients * per_client:
        raise SystemExit(f"{len(results)} of {clients * per_client} requests answered: {failures[:1]}")
    tokens = sum(r["tokens"] for r in results)
    print(f"{clients} client(s): {tokens / wall:.2f} tokens/s", file=sys.stderr, flush=True)  # progress
    return {"clients": clients, "requests": len(results), "completion_tokens": tokens, "seconds": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 2), "median_ttft_s": round(statistics.median(r["ttft"] for r in results), 3),
            "answers": {r["question"]: r["text"] for r in results}}


def build_steps(dtype: str) -> str:
    """Build (or find) the demo model's compiled decode steps for `dtype` before the servers start, as a server
    would in the background; the package's key."""
    from bench.decode import built
    from common.artifacts import resolve_model
    from common.decode_step import FastStep
    from common.modeling import load_for_generation

    return built(FastStep.for_model(load_for_generation(resolve_model(str(MODEL)), dtype)[0], build=True)).key


def short_questions(count: int) -> list[str]:
    """Short questions, as people type them on the page: the first 60 characters of the shared conversations' first
    turns (~100 tokens with the template for SmolLM2's tokenizer). A joining request's prefill pauses the batch, so
    long prompts move time into time to first token and out of tokens/s (docs/performance.md says by how much)."""
    conversations = json.loads(data_path().read_text(encoding="utf-8"))
    return [c["conversation"][0]["input"][:QUESTION_CHARS] for c in conversations[:count]]


def run(quick: bool, dtype: str = "float32", rounds: int = ROUNDS, max_tokens: int = MAX_TOKENS,
        per_client: int = REQUESTS_PER_CLIENT, prompt_cache: float = PROMPT_CACHE_MB) -> dict:
    unasked = iter(dict.fromkeys(short_questions(QUESTIONS)))  # distinct, in order

    def questions(count: int) -> list[str]:
        asked = [q for _, q in zip(range(count), unasked)]
        if len(asked) < count:
            raise SystemExit(f"the bench's conversations have too few distinct questions for {rounds} rounds")
        return asked

    levels, eager_levels = ((2,), (2,)) if quick else (LEVELS, EAGER_LEVELS)
    per_client, max_tokens = (1, 4) if quick else (per_client, max_tokens)
    import torch

    from common import precision

    out = {"bench": "serving", "quick": quick, "model": str(MODEL.relative_to(ROOT)), "cpu": precision.cpu_description(),
           "threads": torch.get_num_threads(), "dtype": dtype, "max_tokens": max_tokens,
           "requests_per_client": per_client, "prompt_cache_mb": prompt_cache, "levels": list(levels), "runs": {}}
    if not quick:
        out["decode_step"] = build_steps(dtype)
    rounds = 1 if quick else rounds
    samples = {COMPILED: {c: [] for c in levels}, EAGER: {c: [] for c in eager_levels}}
    baseline = []  # the compiled server's one client, measured before each of its other levels
    answers = {name: {} for name in samples}  # question -> answer
    # Both servers are up at once, but only one is ever asked: an idle server costs no CPU. --quick builds nothing,
    # so both would be the same eager server: one serves both names.
    with contextlib.ExitStack() as stack:
        flags = ("--max-batch", MAX_BATCH, "--queue-size", "16", "--prompt-cache", str(prompt_cache))
        eager_server = stack.enter_context(Server(dtype, "--eager", *flags))
        compiled_server = eager_server if quick else stack.enter_context(
            Server(dtype, *flags))
        running = {COMPILED: compiled_server.ready(), EAGER: eager_server.ready()}
        if not quick:
            for server in running.values():
                level(server, 1, questions(1), 1, 4)  # warm-up: first-call allocations, the packages' checked steps
                level(server, 2, questions(2), 1, 4)
        for _ in range(rounds):
            for c in levels:
                if c != 1:
                    baseline.append(level(running[COMPILED], 1, questions(per_client), per_client, max_tokens))
                asked = questions(c * per_client)
                result = level(running[COMPILED], c, asked, per_client, max_tokens)
                answers[COMPILED].update(result.pop("answers"))
                samples[COMPILED][c].append(result)
                if c in eager_levels:
                    result = level(running[EAGER], c, asked, per_client, max_tokens)
                    answers[EAGER].update(result.pop("answers"))
                    samples[EAGER][c].append(result)
        # A compiled step switched off (a failed check or load) says so on the server's stderr
        out["compiled_step_warnings"] = [line for line in compiled_server.said().splitlines()
                                         if line.startswith("warning:")]
    for sample in baseline:
        sample.pop("answers")
    samples[COMPILED].setdefault(1, []).extend(baseline)
    for name, runs in samples.items():
        out["runs"][name] = {str(c): {**rs[0], "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rs), 2),
                                      "median_ttft_s": round(statistics.median(r["median_ttft_s"] for r in rs), 3),
                                      "rounds": len(rs)} for c, rs in runs.items()}
    compiled = out["runs"][COMPILED]
    lone = compiled["1"]["tokens_per_s"]
    # Against one client's requests in turn on the same server: the aggregate, and what each client gets
    out["speedup"] = {c: round(r["tokens_per_s"] / lone, 2) for c, r in compiled.items()}
    out["per_client"] = {c: round(r["tokens_per_s"] / int(c) / lone, 2) for c, r in compiled.items()}
    # The questions both servers were asked, greedy: how many the two answered differently (0 in float32 but for a
    # near-tie the compiled step's rounding tips; bfloat16's rounding depends on the batch)
    out["answers_differing"] = sum(answers[COMPILED][q] != a for q, a in answers[EAGER].items())
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dtype", default="float32", help="the servers' --torch-dtype (default float32)")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--requests-per-client", type=int, default=REQUESTS_PER_CLIENT)
    parser.add_argument("--prompt-cache", type=float, default=PROMPT_CACHE_MB, metavar="MB",
                        help="the servers' --prompt-cache (default theirs, %(default)s; 0: off)")
    args = parser.parse_args()
    if not 0 <= args.prompt_cache < float("inf"):
        parser.error("--prompt-cache must be 0 (off) or a number of megabytes")
    print(json.dumps(run(args.quick, args.dtype, args.rounds, args.max_tokens, args.requests_per_client,
                         args.prompt_cache), indent=2))
