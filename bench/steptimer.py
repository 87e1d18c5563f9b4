"""Instrumentation for the training benchmarks' child processes: the wall time of each optimizer step, the tokens it
fed and the tokens that carried a label, the logged losses, and the process's peak RSS."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from transformers import TrainerCallback


def status_mb(field: str) -> float:
    """VmHWM (peak RSS) or VmRSS of this process, in MB."""
    return int(re.search(field + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


class StepTimer(TrainerCallback):
    """Marks the end of every optimizer step. Step 1 is the warm-up (first-call allocations, lazy inits), so the
    figures run from the end of step 1 to the end of the last step."""

    def __init__(self, counts: dict, result_file: str, extra: dict):
        self.counts, self.result_file, self.extra = counts, result_file, extra
        self.marks, self.losses = [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), self.counts["tokens"], self.counts["trained"]))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(round(float(logs["loss"]), 4))

    def on_train_end(self, args, state, control, **kwargs):
        (t0, tok0, tr0), (t1, tok1, tr1) = self.marks[0], self.marks[-1]
        steps = len(self.marks) - 1
        result = {"steps": steps, "seconds": t1 - t0, "tokens": tok1 - tok0, "trained_tokens": tr1 - tr0,
                  "tokens_per_s": (tok1 - tok0) / (t1 - t0), "trained_tokens_per_s": (tr1 - tr0) / (t1 - t0),
                  "trained_tokens_per_step": (tr1 - tr0) / steps,
                  "step_seconds": [round(b[0] - a[0], 3) for a, b in zip(self.marks, self.marks[1:])],
                  "losses": self.losses, "peak_rss_mb": status_mb("VmHWM"), **self.extra}
        Path(self.result_file).write_text(json.dumps(result))


def instrument(trainer, result_file: str, max_length: int) -> None:
    """Count the tokens of every micro-batch (real tokens: padding-free rows have no padding) and those with a
    label at a predicted position (labels shift by one), and time the optimizer steps."""
    counts = {"tokens": 0, "trained": 0}
    original = trainer.training_step

    def training_step(model, inputs, num_items_in_batch=None):
        ids = inputs["input_ids"]
        counts["tokens"] += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else ids.numel()
        counts["trained"] += int((inputs["labels"][:, 1:] != -100).sum())
        return original(model, inputs, num_items_in_batch)

    trainer.training_step = training_step
    data = trainer.train_dataset
    extra = {"rows": len(data)}
    if "seq_lengths" in data.column_names:
        real = sum(sum(lengths) for lengths in data["seq_lengths"])
        extra.update(packed_tokens=real, packing_efficiency=real / (len(data) * max_length))
    trainer.add_callback(StepTimer(counts, result_file, extra))
