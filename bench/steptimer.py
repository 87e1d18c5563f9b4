"""Instrumentation for the training benchmarks' child processes, as a TrainerCallback (no trainer is patched): the
wall time of each optimizer step, the tokens fed and the tokens that carried a label (from the run's logs: the
Trainer's num_input_tokens_seen and common.training's labelled_tokens, so the run logs every step), the logged losses,
and the process's peak RSS (and peak GPU memory on a GPU)."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
from transformers import TrainerCallback


def status_mb(field: str) -> float:
    """VmHWM (peak RSS) or VmRSS of this process, in MB."""
    return int(re.search(field + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


class StepTimer(TrainerCallback):
    """Marks the end of every optimizer step. Step 1 is the warm-up (first-call allocations, lazy inits), so the
    figures run from the end of step 1 to the end of the last step."""

    def __init__(self, result_file: str, max_length: int):
        self.result_file, self.max_length = result_file, max_length
        self.times, self.counts, self.losses, self.extra = {}, {}, [], {}

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        from common.samples import packing_efficiency

        data = train_dataloader.dataset
        self.extra = {"rows": len(data)}
        if "seq_lengths" in data.column_names:
            real, _, efficiency = packing_efficiency(data, self.max_length)
            self.extra.update(packed_tokens=real, packing_efficiency=efficiency)

    def on_step_end(self, args, state, control, **kwargs):
        self.times[state.global_step] = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(round(float(logs["loss"]), 4))
            self.counts[state.global_step] = (logs["num_input_tokens_seen"], logs["labelled_tokens"])

    def on_train_end(self, args, state, control, **kwargs):
        first, last = min(self.times), max(self.times)
        (t0, (tok0, tr0)), (t1, (tok1, tr1)) = (self.times[first], self.counts[first]), (self.times[last], self.counts[last])
        steps = last - first
        result = {"steps": steps, "seconds": t1 - t0, "tokens": tok1 - tok0, "trained_tokens": tr1 - tr0,
                  "tokens_per_s": (tok1 - tok0) / (t1 - t0), "trained_tokens_per_s": (tr1 - tr0) / (t1 - t0),
                  "trained_tokens_per_step": (tr1 - tr0) / steps,
                  "step_seconds": [round(self.times[s + 1] - self.times[s], 3) for s in range(first, last)],
                  "losses": self.losses, "peak_rss_mb": status_mb("VmHWM"), **self.extra}
        if torch.cuda.is_available():  # the GPU's own peak (tensors allocated by torch), for bench/gpu_check.py
            result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        Path(self.result_file).write_text(json.dumps(result))
