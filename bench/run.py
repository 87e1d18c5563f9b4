"""Side-by-side performance figures on this machine: each measured against a baseline in the same run, interleaved
(A B A B, 3 rounds), medians and ratios. Prints a table and writes bench/results.json.

    python bench/run.py                 # all six (~18 minutes on 2 cores)
    python bench/run.py --only training,chat
    python bench/run.py --quick         # everything shrunk (tiny steps, one round, the children in this process):
                                        # checks that the benches run

1 training   train.py vs a plain TRL SFTTrainer script (bench/trl_baseline.py), and train.py with one default changed
2 packing    packing efficiency and padding share of the packed rows of both
3 dataprep   records/s to encode the conversations, cold vs from the cache; cold tokens/s at 1 and 2 processes vs
             the raw batched tokenizer on the same text (bench/dataprep.py)
4 merge      merge.py vs PEFT merge_and_unload + save_pretrained, peak RSS and time (bench/merge_memory.py)
5 chat       chat.py's generation path vs bare model.generate (bench/chat_latency.py)
6 serving    chat.py --serve at 1, 2, 4, 8 concurrent clients vs one client's requests in turn (bench/serving.py)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.training import BASELINE  # noqa: E402

ITEMS = ("training", "dataprep", "merge", "chat", "serving")  # packing comes with training: same rows
TARGETS = {"training_ratio": 2.0, "ceiling_share": {"float32": 0.7, "bfloat16": 0.25}, "packing": 0.97,
           "cached_seconds": 2.0, "prep_share": 0.5, "merge_rss_ratio": 0.5, "chat_overhead": 0.05,
           "serving_speedup_8": 3.0, "serving_per_client_8": 0.4}


def model_shapes(row: int) -> tuple[int, list[tuple[int, int, int]]]:
    """(parameters, the model's own matrix products for one packed row): row x hidden @ hidden x hidden (attention
    projections), row x hidden @ hidden x intermediate (MLP up/gate) and row x intermediate @ intermediate x hidden
    (MLP down). Square 2048^2 products flatter the machine: these are what training multiplies."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.training import MODEL

    config = AutoConfig.from_pretrained(MODEL)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # tied embeddings count once
    h, i = config.hidden_size, config.intermediate_size
    return params, [(row, h, h), (row, h, i), (row, i, h)]


def matmul_gflops(dtype_name: str, shapes: list[tuple[int, int, int]], budget_s: float = 0.5) -> float:
    """GFLOP/s over the given (m, k, n) products on this machine, now (it is shared: the ceiling moves with the
    load). Each product repeats for about budget_s, at least once, so an emulated dtype costs seconds, not minutes."""
    import torch

    dtype = getattr(torch, dtype_name)
    torch.randn(64, 64, dtype=dtype) @ torch.randn(64, 64, dtype=dtype)  # one-off kernel set-up
    flops = seconds = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        start = time.perf_counter()
        reps = 0
        while reps == 0 or time.perf_counter() - start < budget_s:
            a @ b
            reps += 1
        seconds += time.perf_counter() - start
        flops += 2 * m * k * n * reps
    return flops / seconds / 1e9


def machine(row: int, budget_s: float = 0.5) -> dict:
    """What the figures were measured on: CPU capability, native bf16, and the matmul ceiling of each dtype on the
    model's own shapes. LoRA training costs ~4 x params FLOPs per token (forward, and backward through the
    activations; frozen weights get no gradient), so ceiling tokens/s = GFLOP/s / (4 x params)."""
    import torch

    from common import precision

    params, shapes = model_shapes(row)
    out = {"cpu": precision.cpu_description(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "native_bf16": precision.cpu_has_native_bf16(), "threads": torch.get_num_threads(),
           "auto_dtype": precision.resolve("auto", "cpu").name, "params": params,
           "shapes": [list(s) for s in shapes]}
    for name in ("float32", "bfloat16"):
        gflops = matmul_gflops(name, shapes, budget_s)
        out[name] = {"matmul_gflops": round(gflops, 1), "tokens_per_s": round(gflops * 1e9 / (4 * params), 1)}
    return out


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def summarise(results: dict) -> list[dict]:
    """One row per figure: what, ours, baseline, ratio, target, met."""
    rows = []
    if "training" in results:
        t = results["training"]["runs"]
        ours, base = t["train.py"], t[BASELINE]
        # The peer job is float32; on a CPU whose `auto` is bf16, the auto-precision run is held to the bf16 ceiling.
        jobs = {"float32": ours}
        if "train.py, auto precision" in t:
            jobs[results["machine"]["auto_dtype"]] = t["train.py, auto precision"]
        results["training"]["ceiling_share"] = {}
        rows += [
            {"item": "1 training: all (non-padding) tokens/s, steady steps", "ours": ours["tokens_per_s"],
             "baseline": base["tokens_per_s"], "ratio": ours["ratio_tokens_per_s"],
             "target": f">= {TARGETS['training_ratio']}x",
             "met": verdict(ours["ratio_tokens_per_s"] >= TARGETS["training_ratio"])},
            {"item": "1 training: trained (labelled) tokens/s", "ours": ours["trained_tokens_per_s"],
             "baseline": base["trained_tokens_per_s"], "ratio": ours["ratio_trained_tokens_per_s"], "target": "",
             "met": ""},
        ]
        for dtype, run in jobs.items():
            share = run["tokens_per_s"] / results["machine"][dtype]["tokens_per_s"]
            results["training"]["ceiling_share"][dtype] = round(share, 3)
            goal = TARGETS["ceiling_share"][dtype]
            rows.append({"item": f"1 training: share of the {dtype} matmul ceiling ({run['tokens_per_s']} tok/s)",
                         "ours": round(share, 3), "baseline": "", "ratio": "", "target": f">= {goal}",
                         "met": verdict(share >= goal)})
        rows += [
            {"item": "1 training: trained tokens per step", "ours": ours["trained_tokens_per_step"],
             "baseline": base["trained_tokens_per_step"], "ratio": "", "target": "", "met": ""},
            {"item": "1 training: peak RSS MB", "ours": ours["peak_rss_mb"], "baseline": base["peak_rss_mb"],
             "ratio": ours["ratio_peak_rss"], "target": "", "met": ""},
            {"item": "2 packing: efficiency (padding share)",
             "ours": f"{ours['packing_efficiency']:.4f} ({1 - ours['packing_efficiency']:.2%})",
             "baseline": f"{base['packing_efficiency']:.4f} ({1 - base['packing_efficiency']:.2%})", "ratio": "",
             "target": f">= {TARGETS['packing']}", "met": verdict(ours["packing_efficiency"] >= TARGETS["packing"])},
            {"item": "2 packing: tokens in the packed rows (one epoch)", "ours": ours["packed_tokens"],
             "baseline": base["packed_tokens"], "ratio": round(ours["packed_tokens"] / base["packed_tokens"], 2),
             "target": "", "met": ""},
        ]
    if "dataprep" in results:
        d = results["dataprep"]
        rows += [
            {"item": f"3 data prep: records/s ({d['records']} conversations)", "ours": d["cached_records_per_s"],
             "baseline": d["cold_records_per_s"], "ratio": d["speedup_cached"], "target": "", "met": ""},
            {"item": "3 data prep: cached re-run seconds", "ours": d["median_cached_seconds"],
             "baseline": d["median_cold_seconds"], "ratio": "", "target": f"< {TARGETS['cached_seconds']} s",
             "met": verdict(d["median_cached_seconds"] < TARGETS["cached_seconds"])},
        ]
        c = d["ceiling"]
        for n in (1, 2):
            rows.append({"item": f"3 data prep: cold tokens/s vs the batched tokenizer, {n} process(es) ({c['template']})",
                         "ours": c[f"prep_{n}_tokens_per_s"], "baseline": c["tokenizer_tokens_per_s"],
                         "ratio": c[f"prep_{n}_share"], "target": f">= {TARGETS['prep_share']}",
                         "met": verdict(c[f"prep_{n}_share"] >= TARGETS["prep_share"])})
    if "merge" in results:
        m = results["merge"]
        s, p = m["streaming"], m["peft"]
        rss_ratio = s["median_peak_rss_mb"] / p["median_peak_rss_mb"]
        rows += [
            {"item": "4 merge: peak RSS MB", "ours": s["median_peak_rss_mb"], "baseline": p["median_peak_rss_mb"],
             "ratio": round(rss_ratio, 2), "target": f"<= {TARGETS['merge_rss_ratio']}x",
             "met": verdict(rss_ratio <= TARGETS["merge_rss_ratio"])},
            {"item": "4 merge: RSS growth over the imports MB", "ours": s["median_growth_mb"],
             "baseline": p["median_growth_mb"], "ratio": round(s["median_growth_mb"] / max(p["median_growth_mb"], 1), 2),
             "target": "", "met": ""},
            {"item": "4 merge: seconds", "ours": s["median_seconds"], "baseline": p["median_seconds"],
             "ratio": round(s["median_seconds"] / p["median_seconds"], 2), "target": "<= 1.0x",
             "met": verdict(s["median_seconds"] <= p["median_seconds"])},
        ]
    if "chat" in results:
        c = results["chat"]
        rows += [
            {"item": "5 chat: time to first token s", "ours": c["chat.py"]["median_ttft_s"],
             "baseline": c["model.generate"]["median_ttft_s"], "ratio": round(1 + c["ttft_overhead"], 3),
             "target": "overhead <= 5%", "met": verdict(c["ttft_overhead"] <= TARGETS["chat_overhead"])},
            {"item": "5 chat: decode tokens/s", "ours": c["chat.py"]["median_decode_tokens_per_s"],
             "baseline": c["model.generate"]["median_decode_tokens_per_s"],
             "ratio": round(1 / (1 + c["decode_overhead"]), 3), "target": "overhead <= 5%",
             "met": verdict(c["decode_overhead"] <= TARGETS["chat_overhead"])},
        ]
    if "serving" in results:
        s = results["serving"]
        compiled, eager = s["runs"].values()
        lone = compiled["1"] if "1" in compiled else next(iter(compiled.values()))
        for clients, speedup in s["speedup"].items():
            goal = clients == "8"
            rows.append({"item": f"6 serving: completion tokens/s, {clients} client(s) vs one client's requests in "
                                 f"turn ({s['dtype']}, compiled step)",
                         "ours": compiled[clients]["tokens_per_s"], "baseline": lone["tokens_per_s"],
                         "ratio": speedup, "target": f">= {TARGETS['serving_speedup_8']}x" if goal else "",
                         "met": verdict(speedup >= TARGETS["serving_speedup_8"]) if goal else ""})
            if goal:
                per_client = s["per_client"][clients]
                rows.append({"item": "6 serving: tokens/s per client, 8 clients vs one client alone",
                             "ours": round(compiled[clients]["tokens_per_s"] / 8, 2), "baseline": lone["tokens_per_s"],
                             "ratio": per_client, "target": f">= {TARGETS['serving_per_client_8']}x",
                             "met": verdict(per_client >= TARGETS["serving_per_client_8"])})
            rows.append({"item": f"6 serving: median time to first token s, {clients} client(s) (eager server: baseline)",
                         "ours": compiled[clients]["median_ttft_s"],
                         "baseline": eager[clients]["median_ttft_s"] if clients in eager else "",
                         "ratio": "", "target": "", "met": ""})
        for clients, run in eager.items():
            rows.append({"item": f"6 serving: completion tokens/s, {clients} client(s), compiled vs eager server",
                         "ours": compiled[clients]["tokens_per_s"], "baseline": run["tokens_per_s"],
                         "ratio": round(compiled[clients]["tokens_per_s"] / run["tokens_per_s"], 2), "target": "",
                         "met": ""})
    return rows


def candidates_table(results: dict) -> list[str]:
    runs = results["training"]["runs"]
    ours = runs["train.py"]
    lines = []
    for name, r in runs.items():
        if name in ("train.py", BASELINE):
            continue
        lines.append(f"  {name:<42} {r['trained_tokens_per_s']:>8.1f} trained tok/s  {r['tokens_per_s']:>7.1f} tok/s  "
                     f"peak RSS {r['peak_rss_mb']:>7.0f} MB   default is {ours['tokens_per_s'] / r['tokens_per_s']:.2f}x faster")
    return lines


def render(rows: list[dict]) -> str:
    head = ("figure", "ours", "baseline", "ratio", "target", "")
    cells = [head] + [tuple(str(r[k]) for k in ("item", "ours", "baseline", "ratio", "target", "met")) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(head))).rstrip() for c in cells)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="shrink everything: checks that the benches run")
    p.add_argument("--only", default=",".join(ITEMS), help=f"comma-separated subset of {','.join(ITEMS)}")
    p.add_argument("--out", help="results file (default bench/results.json; --quick: bench/results-quick.json)")
    args = p.parse_args()
    only = [i for i in args.only.split(",") if i]
    unknown = set(only) - set(ITEMS)
    if unknown:
        p.error(f"--only: unknown {', '.join(sorted(unknown))} (one of {', '.join(ITEMS)})")
    out = Path(args.out or ROOT / "bench" / ("results-quick.json" if args.quick else "results.json"))

    import torch

    results = {"quick": args.quick, "torch_threads": torch.get_num_threads(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if set(only) != set(ITEMS) and out.is_file():  # a partial re-run updates its items, keeps the others
        results = {**json.loads(out.read_text(encoding="utf-8")), **results}
    if "training" in only:
        from bench import training

        results["machine"] = machine(row=64, budget_s=0.05) if args.quick else machine(row=512)
        results["training"] = training.run(args.quick)
    if "dataprep" in only:
        from bench import dataprep

        results["dataprep"] = dataprep.run(args.quick)
    if "merge" in only:
        from bench import merge_memory

        results["merge"] = merge_memory.run(args.quick)
    if "chat" in only:
        from bench import chat_latency

        results["chat"] = chat_latency.run(args.quick)
    if "serving" in only:
        from bench import serving

        results["serving"] = serving.run(args.quick)
    rows = summarise(results)
    results["table"] = rows
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if "machine" in results:
        m = results["machine"]
        print(f"machine: {m['cpu']}, {m['threads']} threads; matmul on the model's shapes: float32 "
              f"{m['float32']['matmul_gflops']} GFLOP/s, bfloat16 {m['bfloat16']['matmul_gflops']} GFLOP/s; "
              f"auto = {m['auto_dtype']}")
    print(render(rows))
    if "training" in results and not args.quick:
        print("train.py with one default changed (same run, interleaved):")
        print("\n".join(candidates_table(results)))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
