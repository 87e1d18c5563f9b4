"""Peak memory of merging a LoRA adapter: merge.py (streaming) vs PEFT merge_and_unload + save_pretrained.

    python bench/merge_memory.py [--quick]

Base: SmolLM2-135M-Instruct (models/, `make demo-model`) re-saved in 100 MB shards, or, when it is absent, a random
llama of the same shape. --quick: a ~13M-parameter random llama in 8 MB shards, one pair. Adapter: LoRA r=16 on every
linear layer, B random and non-zero. Each merge runs in a fresh subprocess, alternating A B A B. Reported: the peak RSS
while merging (VmHWM, reset after the imports), and what that peak adds over the RSS after imports. (Not ru_maxrss:
a child's starts at its parent's RSS at fork, and the parent here has just built the model.)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import children  # noqa: E402

DEMO_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
PAIRS = 3

# Each child imports the libraries first, then resets the kernel's RSS high-water mark (/proc/self/clear_refs 5), so
# VmHWM at the end is the peak of the merge itself; the import floor (~400 MB of torch + transformers) is reported apart.
CHILD = """
import json, re, runpy, sys, time
import torch, transformers, peft, safetensors, huggingface_hub

def status(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024

path, result_file, args = sys.argv[1], sys.argv[2], sys.argv[3:]
imports_peak = status("VmHWM")
open("/proc/self/clear_refs", "w").write("5")
floor, start = status("VmRSS"), time.time()
if path == "streaming":
    sys.argv = ["merge.py", *args]
    try:
        runpy.run_path("merge.py", run_name="__main__")
    except SystemExit as e:
        if e.code:
            raise
else:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base, adapter, out, shard = args
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype="auto"), adapter)
    model.merge_and_unload().save_pretrained(out, max_shard_size=shard)
json.dump({"imports_peak_mb": imports_peak, "floor_mb": floor, "peak_mb": status("VmHWM"), "seconds": time.time() - start},
          open(result_file, "w"))
"""


def build_inputs(work: Path, quick: bool) -> dict:
    """A base in several shards and a LoRA r=16 on all linear layers with random B. Returns their description."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if quick:
        shard = "8MB"
        config = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=8,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        model, source = LlamaForCausalLM(config), "random llama (quick)"
    elif DEMO_MODEL.is_dir():
        shard = "100MB"
        model, source = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype="auto"), str(DEMO_MODEL.relative_to(ROOT))
    else:  # the shape of SmolLM2-135M
        shard = "100MB"
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
        model, source = LlamaForCausalLM(config), "random llama, SmolLM2-135M shape"
    model.save_pretrained(work / "base", max_shard_size=shard)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    peft_model.save_pretrained(work / "adapter")
    return {
        "source": source,
        "params_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "dtype": str(model.dtype).removeprefix("torch."),
        "shards": len(list((work / "base").glob("*.safetensors"))),
        "size_mb": round(sum(f.stat().st_size for f in (work / "base").glob("*.safetensors")) / 1e6, 1),
        "max_shard_size": shard,
        "adapter": "LoRA r=16 alpha=32 all-linear, random B",
    }


def child(path: str, args: list[str], work: Path) -> children.Child:
    """One merge in a fresh child: the peak RSS of its merge, and the RSS it started from (after imports)."""
    result_file = work / f"{path}.json"
    return children.Child([sys.executable, "-c", CHILD, path, str(result_file), *args], result_file, ROOT)


def run(quick: bool, pairs: int = PAIRS) -> dict:
    rounds = 1 if quick else pairs  # --quick checks that it runs
    with tempfile.TemporaryDirectory(prefix="merge-bench-") as tmp:
        work = Path(tmp)
        inputs = build_inputs(work, quick)
        base, adapter, shard = str(work / "base"), str(work / "adapter"), inputs["max_shard_size"]
        paths = {
            "streaming": [base, adapter, str(work / "out-stream"), "--max-shard-size", shard, "--force"],
            "peft": [base, adapter, str(work / "out-peft"), shard],
        }
        samples = {name: [] for name in paths}
        for _ in range(rounds):  # interleaved A B A B, so drift in the machine's load hits both paths alike
            pair = children.results([child(name, args, work) for name, args in paths.items()], here=quick)
            for name, figures in zip(paths, pair):
                samples[name].append(figures)
        out_shards = {name: len(list((work / f"out-{tag}").glob("*.safetensors"))) for name, tag in (("streaming", "stream"), ("peft", "peft"))}

    result = {"bench": "merge_memory", "quick": quick, "pairs": rounds, "base": inputs, "output_shards": out_shards}
    for name, runs in samples.items():
        growth = [r["peak_mb"] - r["floor_mb"] for r in runs]
        result[name] = {
            "peak_rss_mb": [round(r["peak_mb"], 1) for r in runs],  # during the merge, libraries included
            "growth_mb": [round(g, 1) for g in growth],  # on top of the RSS after imports
            "process_peak_rss_mb": [round(max(r["peak_mb"], r["imports_peak_mb"]), 1) for r in runs],
            "seconds": [round(r["seconds"], 2) for r in runs],
            "median_peak_rss_mb": round(statistics.median(r["peak_mb"] for r in runs), 1),
            "median_growth_mb": round(statistics.median(growth), 1),
            "median_seconds": round(statistics.median(r["seconds"] for r in runs), 2),
        }
    stream, peft = result["streaming"], result["peft"]
    result["ratio_peak_rss_peft_over_streaming"] = round(peft["median_peak_rss_mb"] / stream["median_peak_rss_mb"], 2)
    result["ratio_growth_peft_over_streaming"] = round(peft["median_growth_mb"] / max(stream["median_growth_mb"], 1.0), 2)
    return result


def table(result: dict) -> str:
    b = result["base"]
    lines = [
        f"base: {b['source']}, {b['params_millions']}M params, {b['dtype']}, {b['shards']} shards ({b['size_mb']} MB, "
        f"max {b['max_shard_size']}); {b['adapter']}; {result['pairs']} interleaved pairs, medians",
        f"{'path':<42} {'peak RSS MB':>12} {'over imports':>13} {'seconds':>8} {'shards':>7}",
    ]
    for name, label in (("streaming", "merge.py (streaming)"), ("peft", "PEFT merge_and_unload + save_pretrained")):
        r = result[name]
        lines.append(f"{label:<42} {r['median_peak_rss_mb']:>12.1f} {r['median_growth_mb']:>13.1f} "
                     f"{r['median_seconds']:>8.2f} {result['output_shards'][name]:>7}")
    lines.append(f"PEFT / streaming: peak RSS {result['ratio_peak_rss_peft_over_streaming']}x, "
                 f"memory over the imports {result['ratio_growth_peft_over_streaming']}x")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="merge.py peak memory vs PEFT merge_and_unload + save_pretrained")
    parser.add_argument("--quick", action="store_true", help="a ~13M-parameter model instead of a 135M one")
    result = run(parser.parse_args().quick)
    print(table(result))
    print(json.dumps(result, indent=2))
