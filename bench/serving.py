"""Serving: aggregate completion tokens/s of `chat.py --serve` at 1, 4 and 8 concurrent clients, batched
(--max-batch 8, the default) against one request at a time (--max-batch 1, the server before batching), both servers
running in this run on the demo model with its default dtype, greedy, up to 64 new tokens per request. Time to first
token (from sending the request to the first content delta) is the median over the level's requests.

    python bench/serving.py [--quick]

Each client sends its requests one after another (streaming, through the official `openai` client); the prompts are
the first user turns of the bench's conversations, the same for both servers. Both servers are up, one is asked at a time, levels
alternating between them over two rounds (medians); `seconds` and `requests` are the first round's.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.browser import stop_process  # noqa: E402
from bench.training import MODEL, data_path  # noqa: E402

LEVELS = (1, 4, 8)
REQUESTS_PER_CLIENT = 2
MAX_TOKENS = 64
ROUNDS = 2
BATCHED, ALONE = "batched (--max-batch 8)", "one at a time (--max-batch 1)"
START_TIMEOUT = 180


class Server:
    """A chat.py --serve process on a free local port, stopped on exit from the `with` block."""

    def __init__(self, *flags: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        # --eager: this bench compares batching with none; the compiled decode step (which a lone request would take,
        # once built) is bench/decode.py's
        self.argv = [sys.executable, "chat.py", str(MODEL), "--serve", "--port", str(self.port), "--eager", *flags]

    def __enter__(self) -> Server:
        """Starts the process; `ready()` waits for it (so that two servers import and load at once)."""
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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

    def client(self):
        import openai

        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0,
                             timeout=600)


def one_request(client, model: str, question: str, max_tokens: int) -> dict:
    sent = time.perf_counter()
    first, tokens, text = None, 0, []
    for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=max_tokens,
            stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"ttft": (first or time.perf_counter()) - sent, "tokens": tokens, "text": "".join(text)}


def level(server: Server, clients: int, questions: list[str], per_client: int, max_tokens: int) -> dict:
    """`clients` threads, each sending `per_client` requests in turn; aggregate completion tokens/s over the wall."""
    results: list[dict] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def client_loop(c: int):
        client = server.client()
        try:
            for r in range(per_client):
                outcome = one_request(client, server.model, questions[(c * per_client + r) % len(questions)],
                                      max_tokens)
                with lock:
                    results.append(outcome)
        except Exception as e:  # re-raised below: a thread's exception would otherwise only be printed
            failures.append(e)

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
    return {"clients": clients, "requests": len(results), "completion_tokens": tokens, "seconds": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 2), "median_ttft_s": round(statistics.median(r["ttft"] for r in results), 3),
            "answers": {r["text"] for r in results}}


def run(quick: bool) -> dict:
    conversations = json.loads(data_path().read_text(encoding="utf-8"))
    # Questions cut to 200 characters (~350 tokens of Chinese for SmolLM2's tokenizer): each new request's prefill
    # pauses the batch, and this measures decoding; longer prompts move time to first token, not tokens/s.
    questions = [c["conversation"][0]["input"][:60 if quick else 200] for c in conversations[:16]]
    levels = (2,) if quick else LEVELS
    per_client, max_tokens = (1, 4) if quick else (REQUESTS_PER_CLIENT, MAX_TOKENS)
    servers = {BATCHED: ("--max-batch", "8", "--queue-size", "16"), ALONE: ("--max-batch", "1", "--queue-size", "16")}
    import torch

    from common import precision

    out = {"bench": "serving", "quick": quick, "model": str(MODEL.relative_to(ROOT)), "cpu": precision.cpu_description(),
           "threads": torch.get_num_threads(), "dtype": precision.resolve("auto", "cpu").name, "max_tokens": max_tokens,
           "requests_per_client": per_client, "levels": list(levels), "runs": {}}
    rounds = 1 if quick else ROUNDS
    samples = {name: {c: [] for c in levels} for name in servers}
    answers = {name: set() for name in servers}
    # Both servers are up at once, but only one is ever asked: an idle server costs no CPU. Levels alternate between
    # them (A B, then B A in the next round), so that a change of the machine's load falls on both.
    with Server(*servers[BATCHED]) as batched_server, Server(*servers[ALONE]) as alone_server:
        running = {BATCHED: batched_server.ready(), ALONE: alone_server.ready()}
        if not quick:
            for server in running.values():
                level(server, 1, questions, 1, 4)  # warm-up: first-call allocations
        for round_ in range(rounds):
            for c in levels:
                for name in (BATCHED, ALONE) if round_ % 2 == 0 else (ALONE, BATCHED):
                    result = level(running[name], c, questions, per_client, max_tokens)
                    answers[name] |= result.pop("answers")
                    samples[name][c].append(result)
    for name in servers:
        out["runs"][name] = {str(c): {**rs[0], "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rs), 2),
                                      "median_ttft_s": round(statistics.median(r["median_ttft_s"] for r in rs), 3),
                                      "rounds": len(rs)} for c, rs in samples[name].items()}
    batched, alone = (out["runs"][name] for name in servers)
    out["speedup"] = {c: round(batched[c]["tokens_per_s"] / alone[c]["tokens_per_s"], 2) for c in batched}
    # The same prompts, greedy, on both servers: how many distinct answers only one of them gave (0 in float32;
    # bfloat16's rounding depends on the batch, so answers may part after some tokens).
    out["answers_differing"] = len(answers[BATCHED] ^ answers[ALONE])
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    print(json.dumps(run(parser.parse_args().quick), indent=2))
