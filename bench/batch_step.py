"""The batch decode step alone: milliseconds per `Decoder.step` of 1, 2, 4 and 8 rows through the compiled step
(common/decode_step.py: the lone package for one row, the batch package for several) against the eager batch on the
same model in the same run, and whether both gave every row the same tokens. The server's aggregate is
bench/serving.py; this is the part of it that the batch package decides, without prefills or HTTP.

    python bench/batch_step.py [--dtype float32] [--steps 40] [--rounds 3]

The demo's base model loaded as chat.py loads it, eight short questions of the bench's conversations (their first 60
characters, with the model's template), greedy; each level: the rows added, 5 steps untimed, then `--steps` timed,
compiled and eager alternating over `--rounds` rounds; medians. Aggregate tokens/s is rows over the step's time,
against the compiled lone step's.
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
from bench.serving import short_questions  # noqa: E402
from bench.training import MODEL  # noqa: E402

LEVELS = (1, 2, 4, 8)
WARMUP = 5


def step_time(model, prompts: list[list[int]], steps: int, fast=None) -> tuple[float, list[list[int]]]:
    """Seconds per step of these rows decoded together, and their answers."""
    from common.decoding import Decoder, Row

    decoder = Decoder(model, fast=fast)
    rows = [Row(list(prompt), WARMUP + steps + 1, frozenset()) for prompt in prompts]
    for row in rows:
        decoder.add(row)
    for _ in range(WARMUP):
        decoder.step()
    start = time.perf_counter()
    for _ in range(steps):
        decoder.step()
    seconds = (time.perf_counter() - start) / steps
    decoder.clear()
    return seconds, [row.answer for row in rows]


def run(dtype: str, steps: int, rounds: int) -> dict:
    import torch

    from bench.decode import built
    from common import precision
    from common.artifacts import resolve_model
    from common.decode_step import FastStep
    from common.generation import Generator
    from common.modeling import load_for_generation
    from common.templates import get_template

    model, tokenizer = load_for_generation(resolve_model(str(MODEL)), dtype)
    fast = built(FastStep.for_model(model, build=True))
    if not fast.ready():
        raise SystemExit(f"the compiled decode step did not load: {fast.off}")
    generator = Generator(model, tokenizer, get_template("tokenizer"), max_length=2048)
    prompts = [generator.prompt_ids([{"role": "user", "content": question}])
               for question in short_questions(max(LEVELS))]
    out = {"bench": "batch_step", "model": str(MODEL.relative_to(ROOT)), "cpu": precision.cpu_description(),
           "threads": torch.get_num_threads(), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
           "decode_step": fast.key, "prompt_tokens": [len(p) for p in prompts], "steps": steps, "rounds": rounds,
           "levels": {}}
    with torch.inference_mode():
        for rows in LEVELS:
            compiled, eager, same = [], [], True
            for _ in range(rounds):
                seconds, answers = step_time(model, prompts[:rows], steps, fast)
                compiled.append(seconds)
                seconds, eager_answers = step_time(model, prompts[:rows], steps)
                eager.append(seconds)
                same = same and answers == eager_answers
            level = {"compiled_ms": round(statistics.median(compiled) * 1e3, 1),
                     "eager_ms": round(statistics.median(eager) * 1e3, 1), "same_tokens": same}
            level["compiled_tokens_per_s"] = round(rows / statistics.median(compiled), 1)
            out["levels"][rows] = level
            print(f"{rows} row(s): compiled {level['compiled_ms']} ms, eager {level['eager_ms']} ms, same tokens: "
                  f"{same}", file=sys.stderr, flush=True)
    lone = out["levels"][1]["compiled_tokens_per_s"]
    out["speedup"] = {rows: round(level["compiled_tokens_per_s"] / lone, 2) for rows, level in out["levels"].items()}
    out["compiled_steps"], out["compiled_warnings"] = fast.steps + fast.batch_steps, fast.off
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", help="the model's dtype as chat.py takes it (default float32)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be at least 1")
    print(json.dumps(run(args.dtype, args.steps, args.rounds), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
