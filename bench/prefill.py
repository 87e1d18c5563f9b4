"""A long prompt joining an answer under way: how long the answer under way stalls, chunked prefill (the server's
default, `--prefill-chunk 256`) against the whole prompt prefilled as it joins (`--prefill-chunk 0`, the baseline),
on two servers of the demo's base model (float32, greedy, the compiled decode step built before they start), in the
same run.

    python bench/prefill.py [--rounds 3]

Each round, on each server: client A streams a 96-token answer to a short English question; after A's first 8 text
deltas, client B sends the second conversation of the bench's data as its history (1,206 tokens with SmolLM2's
tokenizer on ../shared/data) and asks for 16 tokens. Figures, medians over rounds: A's longest gap between two text
deltas (the stall), B's time to first token, and A's and B's tokens over the wall from A's request to the later end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.serving import Server, build_steps  # noqa: E402
from bench.training import data_path  # noqa: E402
from common.conversation import turns_to_messages  # noqa: E402
from common.formats import load_conversations  # noqa: E402

SHORT_TOKENS, LONG_TOKENS, DELTAS_BEFORE = 96, 16, 8
SHORT_QUESTION = "Give me five tips for sleeping better, one sentence each."
CHUNKED, WHOLE = "chunked (--prefill-chunk 256)", "whole (--prefill-chunk 0)"


def history(turns: list) -> list[dict]:
    """A conversation as chat messages up to its last user turn (the long prompt): its last answer left out."""
    return turns_to_messages(turns[:-1] + [dataclasses.replace(turns[-1], output=None)])


def stream(client, model: str, messages: list[dict], max_tokens: int, deltas: list[float],
           started: threading.Event | None = None) -> dict:
    """Stream one answer; the arrival time of each text delta goes into `deltas`, `started` is set after
    DELTAS_BEFORE of them."""
    sent = time.perf_counter()
    usage = None
    for chunk in client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            deltas.append(time.perf_counter())
            if started is not None and len(deltas) == DELTAS_BEFORE:
                started.set()
        if chunk.usage is not None:
            usage = chunk.usage
    return {"sent": sent, "end": time.perf_counter(), "completion_tokens": usage.completion_tokens,
            "prompt_tokens": usage.prompt_tokens}


def one_round(server: Server, short: list[dict], long: list[dict]) -> dict:
    client = server.client()
    a_deltas, b_deltas, a_started, results = [], [], threading.Event(), {}
    a = threading.Thread(target=lambda: results.__setitem__(
        "a", stream(client, server.model, short, SHORT_TOKENS, a_deltas, a_started)))
    a.start()
    if not a_started.wait(timeout=300):
        raise SystemExit("the short answer never started")
    results["b"] = stream(server.client(), server.model, long, LONG_TOKENS, b_deltas)
    a.join(timeout=600)
    a_res, b_res = results["a"], results["b"]
    gaps = [later - earlier for earlier, later in zip(a_deltas, a_deltas[1:])]
    wall = max(a_res["end"], b_res["end"]) - a_res["sent"]
    return {"a_longest_gap_s": round(max(gaps), 3), "a_median_gap_s": round(statistics.median(gaps), 3),
            "b_ttft_s": round(b_deltas[0] - b_res["sent"], 3), "b_prompt_tokens": b_res["prompt_tokens"],
            "tokens_per_s": round((a_res["completion_tokens"] + b_res["completion_tokens"]) / wall, 2)}


def run(rounds: int, dtype: str = "float32") -> dict:
    # English, so that each token of A's answer is a text delta of its own (a Chinese character often takes two or
    # three of SmolLM2's tokens, and the gap before it would count several steps)
    short = [{"role": "user", "content": SHORT_QUESTION}]
    long = history(load_conversations([str(data_path())])[1])
    out = {"bench": "prefill", "dtype": dtype, "decode_step": build_steps(dtype), "rounds": rounds, "runs": {}}
    with Server(dtype, "--max-batch", "8") as chunked, \
            Server(dtype, "--max-batch", "8", "--prefill-chunk", "0") as whole:
        servers = {CHUNKED: chunked.ready(), WHOLE: whole.ready()}
        for server in servers.values():  # warm-up: first-call allocations, the packages' checked steps
            one_round(server, short, short)
        samples = {name: [] for name in servers}
        for _ in range(rounds):  # interleaved, so drift in the machine's load hits both alike
            for name, server in servers.items():
                samples[name].append(one_round(server, short, long))
                print(f"{name}: {samples[name][-1]}", file=sys.stderr, flush=True)
    for name, rs in samples.items():
        out["runs"][name] = {key: statistics.median(r[key] for r in rs) for key in rs[0]}
    c, w = out["runs"][CHUNKED], out["runs"][WHOLE]
    out["stall_ratio"] = round(c["a_longest_gap_s"] / w["a_longest_gap_s"], 3)
    out["ttft_ratio"] = round(c["b_ttft_s"] / w["b_ttft_s"], 3)
    out["throughput_ratio"] = round(c["tokens_per_s"] / w["tokens_per_s"], 3)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    print(json.dumps(run(args.rounds, args.dtype), indent=2))
