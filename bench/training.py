"""Training throughput: train.py (the demo recipe's defaults) against the plain TRL script (bench/trl_baseline.py),
and train.py with one default changed at a time (the candidates), each run in a fresh process, interleaved.

    python bench/training.py [--quick]

Both train SmolLM2-135M-Instruct with LoRA r=16 on all linear layers, on the same conversations, in packed rows of
512 tokens, one row per optimizer step; a warm-up step, then the same number of timed steps. Model loading and data
preparation are outside the timed steps; the peak RSS is the whole process's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import children  # noqa: E402
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
RECIPE = ROOT / "recipes" / "demo_smollm2.yaml"
SHARED_DATA = ROOT.parent / "shared" / "data" / "psych_multiturn.json"
BASELINE = "TRL SFTTrainer (plain script)"
PAIRS, STEPS, QUICK_STEPS = 3, 7, 1  # the peer job: 8 steps, the first a warm-up, steps 2-8 timed

# train.py with one default changed: what each default buys. `overrides` are recipe overrides; `train.fast_paths`
# switches common/acceleration.py's paths (false: SFTTrainer as it comes: sdpa over the packed row with its mask,
# PEFT's LoRA forward, its own loss with the LM head at every position).
VARIANTS = {
    "train.py": [],
    "train.py, plain paths (no common/acceleration.py)": ["train.fast_paths=false"],
    "train.py, LM head at every position": ["train.fast_paths=[packed_attention,fused_lora]"],
    "train.py, auto precision": ["model.dtype=auto"],
    "train.py, gradient checkpointing": ["train.gradient_checkpointing=true"],
}  # every run logs every step: the step timer reads its token counts from the logs


def data_path() -> Path:
    return SHARED_DATA if SHARED_DATA.is_file() else ROOT / "data" / "psych_sample.json"


def peer_job_args(tmp: Path, steps: int, max_length: int, data_file: Path | None = None) -> list[str]:
    """train.py's arguments for the peer job: SmolLM2-135M, LoRA r16 on the seven linear kinds, dropout 0, float32,
    sdpa-based attention, packed rows of max_length, batch 1, no accumulation, no evaluation, steps + 1 steps."""
    return [str(RECIPE), f"model.path={MODEL}", f"data.path={data_file or data_path()}", f"data.max_length={max_length}",
            "data.eval_path=null", "lora.dropout=0.0", "model.dtype=float32", f"train.max_steps={steps + 1}",
            "train.batch_size=1", "train.grad_accum=1", "train.save_steps=100000", f"train.output_dir={tmp / 'run'}",
            "evaluation.prompts=[]", "evaluation.every_n_steps=0"]


def child_ours(result_file: str, max_length: int, recipe_args: list[str]) -> None:
    """Runs train.py's main() with the step timer as one more callback."""
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    import train
    from steptimer import StepTimer

    sys.exit(train.main(recipe_args, extra_callbacks=[StepTimer(result_file, max_length)]))


def run_child(cmd: list[str], result_file: Path, env: dict) -> dict:
    # Run in the scratch dir: train.py points work_dirs/latest at its run, and the user's latest run must stay latest.
    return children.results([children.Child(cmd, result_file, result_file.parent, env)])[0]


def run(quick: bool, work: Path | None = None, variants: list[str] | None = None, pairs: int = PAIRS) -> dict:
    steps = QUICK_STEPS if quick else STEPS
    max_length = 256 if quick else 512  # 256: a first answer fits in TRL's truncated conversations
    data = data_path()
    limit = 40 if quick else None
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        tmp = Path(tmp)
        if limit:  # --quick: the first conversations only
            subset = tmp / "data.json"
            subset.write_text(json.dumps(json.loads(data.read_text(encoding="utf-8"))[:limit], ensure_ascii=False),
                              encoding="utf-8")
            data_file = subset
        else:
            data_file = data
        # Encoded rows (ours) and TRL's mapped datasets cache here, warmed by the first run of each.
        env = {**os.environ, "HF_DATASETS_CACHE": str(work or tmp / "cache"), "TOKENIZERS_PARALLELISM": "false"}
        recipe_args = peer_job_args(tmp, steps, max_length, data_file)
        from common import precision

        names = ["train.py"] if quick else variants or list(VARIANTS)
        if precision.resolve("auto", "cpu").name == "float32":  # auto is the float32 run itself here
            names = [n for n in names if n != "train.py, auto precision"]
        # A result file per child, read back by children.results
        files = {name: tmp / f"result-{i}.json" for i, name in enumerate([BASELINE, *names])}
        commands = {BASELINE: [
            sys.executable, str(ROOT / "bench" / "trl_baseline.py"), str(MODEL), str(data_file), "--max-steps", str(steps + 1),
            "--max-length", str(max_length), "--timing", str(files[BASELINE])]}
        for name in names:
            commands[name] = [sys.executable, str(Path(__file__).resolve()), "--child", str(files[name]), str(max_length),
                              *recipe_args, *VARIANTS[name], "--force"]
        runs = {name: [] for name in commands}
        # Run in the scratch dir: train.py points work_dirs/latest at its run, and the user's latest run must stay latest.
        batch = lambda: [children.Child(cmd, files[name], tmp, env) for name, cmd in commands.items()]  # noqa: E731
        for _ in range(1 if quick else pairs):  # interleaved, so drift in the machine's load hits all alike
            for name, figures in zip(commands, children.results(batch(), here=quick)):
                runs[name].append(figures)

    result = {"bench": "training", "quick": quick, "model": str(MODEL.relative_to(ROOT)), "data": str(data),
              "conversations": limit or len(json.loads(data.read_text(encoding="utf-8"))),
              "max_length": max_length, "timed_steps": steps, "rounds": len(next(iter(runs.values()))), "runs": {}}
    for name, rs in runs.items():
        med = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
        result["runs"][name] = {
            "tokens_per_s": round(med("tokens_per_s"), 1), "trained_tokens_per_s": round(med("trained_tokens_per_s"), 1),
            "trained_tokens_per_step": round(med("trained_tokens_per_step"), 1),
            "tokens_per_step": round(statistics.median(r["tokens"] / r["steps"] for r in rs), 1),
            "peak_rss_mb": round(med("peak_rss_mb"), 1), "packing_efficiency": rs[0].get("packing_efficiency"),
            "rows": rs[0]["rows"], "packed_tokens": rs[0].get("packed_tokens"),
            "samples": [{k: r[k] for k in ("tokens_per_s", "trained_tokens_per_s", "peak_rss_mb", "step_seconds",
                                           "losses", "process_seconds")} for r in rs],
        }
    base = result["runs"][BASELINE]
    for name, r in result["runs"].items():
        r["ratio_tokens_per_s"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)
        r["ratio_trained_tokens_per_s"] = round(r["trained_tokens_per_s"] / base["trained_tokens_per_s"], 2)
        r["ratio_peak_rss"] = round(r["peak_rss_mb"] / base["peak_rss_mb"], 2)
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_ours(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--variants", help=f"a ;-separated subset of: {'; '.join(VARIANTS)}")
    parser.add_argument("--pairs", type=int, default=PAIRS)
    args = parser.parse_args()
    chosen = args.variants.split(";") if args.variants else None
    print(json.dumps(run(args.quick, variants=chosen, pairs=args.pairs), indent=2))
