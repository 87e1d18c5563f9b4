"""Where a training step's time goes: train.py on the peer job (bench/training.py), steps 3-4 under torch.profiler,
self CPU time per op and per kind of op. Appends a section to bench/PROFILE.md (or prints it).

    python bench/step_profile.py [--dtype float32|auto] [--plain] [--out bench/PROFILE.md]

--plain: `train.fast_paths=false`, SFTTrainer as it comes (sdpa with the packed-sequence mask, PEFT's LoRA forward,
its own loss with the LM head at every position), to see what common/acceleration.py changes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

KINDS = {  # op name fragment -> kind, first match wins
    "attention": "attention", "mm": "matrix products", "addmm": "matrix products", "bmm": "matrix products",
    "log_softmax": "loss", "logsumexp": "loss", "nll": "loss", "cross_entropy": "loss", "exp": "loss",
    "Optimizer": "optimizer", "lerp": "optimizer", "addcdiv": "optimizer", "sqrt": "optimizer",
    "mul": "elementwise", "add": "elementwise", "silu": "elementwise", "pow": "elementwise", "rsqrt": "elementwise",
    "neg": "elementwise", "cat": "elementwise", "div": "elementwise", "mean": "elementwise", "sub": "elementwise",
    "fill": "zero-fill / copies", "copy": "zero-fill / copies", "zero": "zero-fill / copies", "_to_copy": "zero-fill / copies",
}


def kind(name: str) -> str:
    op = name.removeprefix("aten::")
    return next((k for frag, k in KINDS.items() if frag in op), "other")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--plain", action="store_true")
    p.add_argument("--out", help="append the section to this markdown file")
    args = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from common import precision
    from training import data_path, peer_job_args

    class Profiled(TrainerCallback):
        def __init__(self):
            self.prof, self.start, self.tokens, self.report = None, 0.0, 0, ""

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == 2:
                self.prof = profile(activities=[ProfilerActivity.CPU])
                self.prof.__enter__()
                self.start = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == 4 and self.prof is not None:
                seconds = time.perf_counter() - self.start
                self.prof.__exit__(None, None, None)
                self.report = table(self.prof.key_averages(), seconds)
                self.prof = None

    overrides = [f"model.dtype={args.dtype}", "train.max_steps=5"] + (["train.fast_paths=false"] if args.plain else [])
    callback = Profiled()
    import tempfile

    import train

    with tempfile.TemporaryDirectory() as tmp:
        train.main(peer_job_args(Path(tmp), steps=4, max_length=512) + overrides + ["--force"], extra_callbacks=[callback])
    header = (f"## {precision.cpu_description()}, {torch.get_num_threads()} threads, "
              f"{precision.resolve(args.dtype, 'cpu').name}{', plain paths' if args.plain else ''}\n\n"
              f"Data: {data_path().name}; steps 3-4 of the peer job (one packed row of 512 per step).\n\n")
    text = header + callback.report
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0


def table(events, seconds: float) -> str:
    total = sum(e.self_cpu_time_total for e in events) or 1
    by_kind: dict[str, float] = {}
    for e in events:
        by_kind[kind(e.key)] = by_kind.get(kind(e.key), 0.0) + e.self_cpu_time_total
    lines = [f"Wall time of the two steps: {seconds:.2f} s.\n", "| kind of op | self CPU time | share |", "|---|---|---|"]
    lines += [f"| {k} | {v / 1e6:.2f} s | {100 * v / total:.1f}% |" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    lines += ["", "| op | calls | self CPU time | share |", "|---|---|---|---|"]
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        lines.append(f"| `{e.key[:60]}` | {e.count} | {e.self_cpu_time_total / 1e6:.3f} s | "
                     f"{100 * e.self_cpu_time_total / total:.1f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
