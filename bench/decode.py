"""Decode speed: tokens/s of the generation core (common/decoding.py, one answer alone, as chat.py, eval.py and the
training previews decode, on a model from `load_for_generation`, float32 products split over the threads) against
plain `model.generate` with the same settings on the model as transformers loads it, in the same run, and against
llama.cpp on our own GGUF export of the same model when llama-cpp-python is installed (issue 26's reference).

    python bench/decode.py [--quick] [--llama-python PATH]

Greedy, on the demo model, float32 and the `auto` dtype, up to 64 and 256 new tokens, two short English questions;
then (not with --quick) a long pass: 64 new tokens after a counselling session of ~1,900 prompt tokens, where the
cache, not the weights, grows to matter. Each answer ends at EOS or the limit, the same tokens on all paths
(checked). Decode tokens/s: tokens after the first over the time after the
first; time to first token: from the call to the first token. Alternating A B, then B A; medians over rounds.
llama.cpp: `--llama-python` names a Python that has `llama_cpp` (it compiles llama.cpp from source, ~10 minutes on 2
cores, so it lives in a venv of its own: `python3 -m venv ../llamavenv && ../llamavenv/bin/pip install
llama-cpp-python`), default $LLAMA_CPP_PYTHON; the f16 GGUF is written by `merge.py --gguf f16` into a temporary
copy of the model; 2 threads, greedy, the same prompt ids. Without it the figure is reported as skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.training import MODEL  # noqa: E402

QUESTIONS = ["Explain in detail how to build a habit of going to bed on time.",
             "Write a long letter to a friend who feels anxious about exams."]
ROUNDS = 3
# The long pass: a counselling session of this many prompt tokens at most (llama.cpp's context here is 2,048), the
# sample's conversations as its earlier turns (data/psych_sample.json; Chinese costs SmolLM2 many tokens)
LONG_PROMPT_TOKENS = 1900
SESSION = ROOT / "data" / "psych_sample.json"
BUILD_TIMEOUT = 1800  # seconds for a compiled step's build (~2 minutes for SmolLM2 on 2 quiet cores; more loaded)

# Run by llama.cpp's Python: argv = GGUF path, max new tokens, threads, then JSON prompt id lists on stdin.
LLAMA_SCRIPT = """
import json, sys, time
from llama_cpp import Llama
path, limit, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_threads=threads, n_ctx=2048, verbose=False)
out = []
for ids in json.loads(sys.stdin.read()):
    llm.reset()
    start, n = time.perf_counter(), 0
    for token in llm.generate(ids, temp=0.0, top_k=1):
        n += 1
        if n == 1:
            first = time.perf_counter()
        if token == llm.token_eos() or n >= limit:
            break
    end = time.perf_counter()
    out.append({"ttft": first - start, "decode": (n - 1) / (end - first) if n > 1 else 0.0, "tokens": n})
print(json.dumps(out))
"""


def timed(decode) -> dict:
    """decode(on_token) -> answer ids; on_token is called once per new token."""
    marks = []
    start = time.perf_counter()
    ids = decode(lambda: marks.append(time.perf_counter()))
    end = time.perf_counter()
    return {"ttft": marks[0] - start, "decode": (len(ids) - 1) / (end - marks[0]), "tokens": len(ids), "ids": ids}


def compiled_step(model, root: Path) -> tuple:
    """(FastStep, seconds its build took here, None if it was built before) of the model's compiled decode step,
    built by the background process chat.py starts, waited for."""
    from common.decode_step import FastStep

    fast = FastStep.for_model(model, build=True, root=root)
    start, building = time.perf_counter(), fast is not None and (root / f"{fast.key}.lock").exists()
    built(fast)
    return fast, round(time.perf_counter() - start, 1) if building else None


def built(fast):
    """`fast` (a FastStep whose build may be under way) once its package is there: the benches measure a model that
    has its compiled step, as every run after the first of a model shape does. Exits naming the build's log when
    there is none (None: no compiled step applies to the model)."""
    if fast is None:
        raise SystemExit("no compiled decode step applies to this model (see common/decode_step.py: structure)")
    if not fast.wait_for_build(BUILD_TIMEOUT):
        raise SystemExit(f"no compiled decode step was built; see {fast.root / (fast.key + '.log')}")
    return fast


def long_session(generator) -> list[dict]:
    """A long counselling session ending in a question: the sample's conversations as earlier turns, as many of the
    latest as fit in LONG_PROMPT_TOKENS."""
    turns = [turn for record in json.loads(SESSION.read_text(encoding="utf-8")) for turn in record["conversation"]]
    messages = [{"role": "user", "content": "我最近总是睡不好，白天也提不起精神，该怎么办？"}]
    for turn in reversed(turns):
        longer = [{"role": "user", "content": turn["input"]}, {"role": "assistant", "content": turn["output"]},
                  *messages]
        if len(generator.prompt_ids(longer)) > LONG_PROMPT_TOKENS:
            return messages
        messages = longer
    return messages


def core_and_generate(dtype: str, limit: int, rounds: int, steps: Path, long: bool = False) -> dict:
    import torch

    from common.artifacts import resolve_model
    from common.decoding import Decoder, Row
    from common.generation import Generator, Sampling
    from common.modeling import load_for_generation
    from common.templates import get_template

    model, tokenizer = load_for_generation(resolve_model(str(MODEL)), dtype)
    plain_model = load_for_generation(resolve_model(str(MODEL)), dtype, threaded_products=False)[0]
    fast, build_s = compiled_step(model, steps)
    generator = Generator(model, tokenizer, get_template("tokenizer"), max_length=2048)
    sampling = Sampling(max_new_tokens=limit)
    config = generator.generation_config(sampling)
    prompts = ([generator.prompt_ids(long_session(generator))] if long
               else [generator.prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS])

    class FirstToken:  # generate()'s streamer: its first put() is the prompt, each later one a new token
        def __init__(self, on_token):
            self.calls, self.on_token = 0, on_token

        def put(self, value):
            self.calls += 1
            if self.calls >= 2:
                self.on_token()

        def end(self):
            pass

    def core(ids, fast=None):
        # should_stop is asked after each new token but an ending EOS: the first mark is the first token all the same
        def decode(on_token):
            row = Row(ids, limit, frozenset(generator.eos_ids), lambda answer: on_token() or False)
            Decoder(model, fast=fast).run(row)
            return row.answer
        return timed(decode)

    def compiled(ids):
        return core(ids, fast)

    def plain(ids):
        def decode(on_token):
            input_ids = torch.tensor([ids])
            with torch.inference_mode():
                out = plain_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                           generation_config=config, streamer=FirstToken(on_token))
            return out[0, len(ids):].tolist()
        return timed(decode)

    paths = (("core", core), ("generate", plain), ("compiled", compiled))
    samples = {name: [] for name, _ in paths}
    first_answer = compiled(prompts[0])  # the process's first compiled answer: loads the package, checks a step
    core(prompts[0])  # warm-up: first-call allocations
    for round_ in range(rounds):
        for ids in prompts:
            results = {name: run(ids) for name, run in (paths if round_ % 2 == 0 else paths[::-1])}
            for name, r in results.items():
                same = r["ids"] == results["core"]["ids"]
                samples[name].append({**{k: v for k, v in r.items() if k != "ids"}, "same_tokens": same})
    if not fast.verified or fast.off:
        raise RuntimeError(f"the compiled step was not used: {fast.off}")
    out = {"dtype": str(model.dtype).removeprefix("torch."), "prompts_tokens": [len(p) for p in prompts],
           "compiled_build_s": build_s, "compiled_first_answer_ttft_s": round(first_answer["ttft"], 4)}
    for name, rs in samples.items():
        out[name] = {"decode_tokens_per_s": round(statistics.median(r["decode"] for r in rs), 2),
                     "ttft_s": round(statistics.median(r["ttft"] for r in rs), 4),
                     "tokens": statistics.median(r["tokens"] for r in rs)}
    out["same_tokens"] = all(r["same_tokens"] for rs in samples.values() for r in rs)
    out["core_vs_generate"] = round(out["core"]["decode_tokens_per_s"] / out["generate"]["decode_tokens_per_s"], 3)
    out["compiled_vs_generate"] = round(out["compiled"]["decode_tokens_per_s"]
                                        / out["generate"]["decode_tokens_per_s"], 3)
    out["prompts"] = prompts
    return out


def llama_cpp(python: str, prompts: list[list[int]], limit: int, rounds: int) -> dict:
    """llama.cpp's decode on the f16 GGUF of the demo model (exported into a temporary copy of it)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / MODEL.name
        shutil.copytree(MODEL, copy)
        subprocess.run([sys.executable, "merge.py", str(copy), "--gguf", "f16"], cwd=ROOT, check=True,
                       capture_output=True, timeout=600)
        runs = []
        for _ in range(rounds):
            proc = subprocess.run([python, "-c", LLAMA_SCRIPT, str(copy / "model-f16.gguf"), str(limit), "2"],
                                  input=json.dumps(prompts), capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                return {"skipped": f"llama.cpp failed: {proc.stderr.strip().splitlines()[-1:]}"}
            runs += json.loads(proc.stdout)
    return {"decode_tokens_per_s": round(statistics.median(r["decode"] for r in runs), 2),
            "ttft_s": round(statistics.median(r["ttft"] for r in runs), 4),
            "tokens": statistics.median(r["tokens"] for r in runs)}


def run(quick: bool, llama_python: str | None = None, steps: Path | None = None) -> dict:
    from common import precision

    limits = (8,) if quick else (64, 256)
    rounds = 1 if quick else ROUNDS
    out = {"bench": "decode", "quick": quick, "model": str(MODEL.relative_to(ROOT)), "cpu": precision.cpu_description(),
           "auto_dtype": precision.resolve("auto", "cpu").name, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        steps = steps or Path(tmp)  # a cold build, timed, unless --steps names a cache
        for dtype in ("float32", "auto"):
            for limit in limits:
                out["runs"].append(one_run(dtype, limit, rounds, steps, llama_python))
        if not quick:
            out["runs"].append(one_run("auto", 64, rounds, steps, llama_python, long=True))
    return out


def one_run(dtype: str, limit: int, rounds: int, steps: Path, llama_python: str | None, long: bool = False) -> dict:
    result = {"max_new_tokens": limit, "long_session": long,
              **core_and_generate(dtype, limit, rounds, steps, long)}
    prompts = result.pop("prompts")
    if llama_python and dtype == "auto":
        result["llama.cpp f16"] = llama_cpp(llama_python, prompts, limit, rounds)
    elif dtype == "auto":
        result["llama.cpp f16"] = {"skipped": "no llama-cpp-python (--llama-python or $LLAMA_CPP_PYTHON)"}
    llama = result.get("llama.cpp f16", {})
    if "decode_tokens_per_s" in llama:
        for path in ("core", "compiled"):
            result[f"{path}_vs_llama_cpp"] = round(result[path]["decode_tokens_per_s"] / llama["decode_tokens_per_s"], 3)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--llama-python", default=os.environ.get("LLAMA_CPP_PYTHON"),
                        help="a Python with llama_cpp installed (default $LLAMA_CPP_PYTHON)")
    parser.add_argument("--steps", type=Path, help="compiled decode steps' cache to use (default: a new one, so the "
                        "build is timed cold)")
    args = parser.parse_args()
    print(json.dumps(run(args.quick, args.llama_python, args.steps), indent=2))
