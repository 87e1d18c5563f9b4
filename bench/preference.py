"""Preference-tuning throughput: train.py's DPO (recipes/psych_dpo.yaml on the base model) against a plain TRL
DPOTrainer script (bench/trl_dpo_baseline.py), and train.py with the fast paths off, each in a fresh process,
interleaved. Not part of bench/run.py's table (yet): its own JSON.

    python bench/preference.py [--rounds 2] [--steps 3] [--batch-size 2] [--quick]

Both: SmolLM2-135M-Instruct, LoRA r=16 alpha 32 dropout 0 on all linear layers, float32, the 71 shipped pairs in the
same order (no system prompt added: TRL gets the records as they are), batches of --batch-size pairs, a warm-up step
then --steps timed steps. Tokens/s counts the non-padding tokens of the policy's batches (the Trainer's own counter),
so the reference forward is inside the time but not in the count, for both. The first step's loss and rewards are
reported: policy and reference are the same model there (log 2 and 0 for both); tests/test_preference.py compares the
later steps on identical rows.
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
from bench.training import MODEL, child_ours, run_child  # noqa: E402

RECIPE = ROOT / "recipes" / "psych_dpo.yaml"
PAIRS = ROOT / "data" / "psych_pairs.json"
BASELINE = "TRL DPOTrainer (plain script)"
VARIANTS = {"train.py": [], "train.py, plain paths (train.fast_paths=false)": ["train.fast_paths=false"]}


def recipe_args(tmp: Path, steps: int, batch: int) -> list[str]:
    return [str(RECIPE), f"model.path={MODEL}", "model.dtype=float32", "data.system=null", "data.eval_path=null",
            f"train.max_steps={steps + 1}", f"train.batch_size={batch}", "train.grad_accum=1", "train.warmup_ratio=0",
            "train.save_steps=100000", f"train.output_dir={tmp / 'run'}", "evaluation.prompts=[]",
            "evaluation.every_n_steps=0"]


def run(rounds: int, steps: int, batch: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "HF_DATASETS_CACHE": str(tmp / "cache"), "TOKENIZERS_PARALLELISM": "false"}
        result_file = tmp / "result.json"
        commands = {BASELINE: [sys.executable, str(ROOT / "bench" / "trl_dpo_baseline.py"), str(MODEL), str(PAIRS),
                               "--max-steps", str(steps + 1), "--batch-size", str(batch), "--timing", str(result_file)]}
        for name, overrides in VARIANTS.items():
            commands[name] = [sys.executable, str(Path(__file__).resolve()), "--child", str(result_file), "512",
                              *recipe_args(tmp, steps, batch), *overrides, "--force"]
        runs = {name: [] for name in commands}
        for _ in range(rounds):  # interleaved, so drift in the machine's load hits all alike
            for name, cmd in commands.items():
                runs[name].append(run_child(cmd, result_file, env))
    from common import precision

    result = {"bench": "preference", "model": str(MODEL.relative_to(ROOT)), "pairs": str(PAIRS.relative_to(ROOT)),
              "batch_pairs": batch, "timed_steps": steps, "rounds": rounds,
              "machine": {"cpu": precision.cpu_description(), "native_bf16": precision.cpu_has_native_bf16(),
                          "threads": os.cpu_count()}, "runs": {}}
    for name, rs in runs.items():
        result["runs"][name] = {
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rs), 1),
            "tokens_per_step": round(statistics.median(r["tokens"] / r["steps"] for r in rs), 1),
            "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in rs), 1),
            "first_losses": [r["losses"][0] for r in rs],
            "samples": [{k: r[k] for k in ("tokens_per_s", "step_seconds", "losses", "peak_rss_mb")} for r in rs]}
    base = result["runs"][BASELINE]["tokens_per_s"]
    for r in result["runs"].values():
        r["ratio_tokens_per_s"] = round(r["tokens_per_s"] / base, 2)
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_ours(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one round, one timed step")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "preference_results.json")
    args = parser.parse_args()
    result = run(1 if args.quick else args.rounds, 1 if args.quick else args.steps, args.batch_size)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for name, r in result["runs"].items():
        print(f"{name:<48} {r['tokens_per_s']:>8.1f} tokens/s  {r['ratio_tokens_per_s']:.2f}x  first loss {r['first_losses']}")
