"""Prompt cache: the time to a conversation's next turn's first token with the REPL's and the server's prompt cache
(`chat.py --prompt-cache`, common.decoding.PromptCache) against without it, turn after turn of real multi-turn
counselling conversations, as the web page sends them (each turn repeats the whole conversation so far, with the
recorded answers). The demo's model, greedy; the first token of each turn must be the same both ways.

    python bench/prompt_cache.py [--quick] [--dtype float32]

Per turn: the prompt's tokens, how many the cache held, and the prefill + first token time both ways (the median of
`--repeats`, alternating). --quick: one conversation's first three turns, one repeat.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.training import MODEL, data_path  # noqa: E402

CONVERSATIONS = 2
MAX_TURNS = 6
REPEATS = 3
MAX_PROMPT = 1800  # tokens: SmolLM2's Chinese costs ~1,700 a shared conversation


def turns_of(conversation: list[dict], max_turns: int) -> list[list[dict]]:
    """The messages the page sends at each turn: every earlier question and answer, then the new question."""
    messages, asked = [], []
    for turn in conversation[:max_turns]:
        asked.append(messages + [{"role": "user", "content": turn["input"]}])
        messages = asked[-1] + [{"role": "assistant", "content": turn["output"]}]
    return asked


def first_token(generator, messages: list[dict], sampling) -> tuple[float, int, int]:
    """Seconds from the prompt's ids to its first token (the prefill and the pick), the token, and the positions
    the cache held."""
    answering = generator.start(messages, sampling)
    decoder = generator.decoder()
    before = decoder.prompts.reused if decoder.prompts else 0
    started = time.perf_counter()
    decoder.add(answering.row)
    seconds = time.perf_counter() - started
    decoder.clear()
    return seconds, answering.row.answer[0], (decoder.prompts.reused if decoder.prompts else 0) - before


def run(quick: bool, dtype: str = "float32", repeats: int = REPEATS) -> dict:
    import torch

    from common import precision
    from common.artifacts import resolve_model
    from common.generation import Generator, Sampling
    from common.modeling import load_for_generation
    from common.server import PROMPT_CACHE_MB
    from common.templates import get_template

    model, tokenizer = load_for_generation(resolve_model(str(MODEL)), dtype)
    conversations = [c["conversation"] for c in json.loads(data_path().read_text(encoding="utf-8"))
                     if len(c["conversation"]) >= 3][:1 if quick else CONVERSATIONS]
    repeats = 1 if quick else repeats
    sampling = Sampling(max_new_tokens=1, temperature=0)
    template = get_template("tokenizer")
    out = {"bench": "prompt_cache", "quick": quick, "model": str(MODEL.relative_to(ROOT)),
           "cpu": precision.cpu_description(), "threads": torch.get_num_threads(), "dtype": dtype,
           "prompt_cache_mb": PROMPT_CACHE_MB, "conversations": []}
    for conversation in conversations:
        turns = []
        # A fresh cache per conversation and repeat: each turn finds only the turns before it of its own
        for r in range(repeats):
            cached = Generator(model, tokenizer, template, prompt_cache_mb=PROMPT_CACHE_MB)
            plain = Generator(model, tokenizer, template)
            for t, messages in enumerate(turns_of(conversation, 3 if quick else MAX_TURNS)):
                tokens = len(plain.prompt_ids(messages))
                if tokens > MAX_PROMPT:
                    break
                with_cache = first_token(cached, messages, sampling)
                without = first_token(plain, messages, sampling)
                if with_cache[1] != without[1]:
                    raise SystemExit(f"turn {t + 1}: the first token differs with the cache ({with_cache[1]} against "
                                     f"{without[1]})")
                if r == 0:
                    turns.append({"turn": t + 1, "prompt_tokens": tokens, "cached_tokens": with_cache[2],
                                  "with_cache": [], "without": []})
                turns[t]["with_cache"].append(with_cache[0])
                turns[t]["without"].append(without[0])
        for turn in turns:
            for way in ("with_cache", "without"):
                turn[f"{way}_s"] = round(statistics.median(turn.pop(way)), 3)
            turn["speedup"] = round(turn["without_s"] / turn["with_cache_s"], 2)
        out["conversations"].append(turns)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    print(json.dumps(run(args.quick, args.dtype, args.repeats), indent=2))
