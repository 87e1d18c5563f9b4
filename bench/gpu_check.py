"""The measuring steps of bench/gpu_check.sh, one subcommand each; every one prints markdown for the results file and
exits 0 when it measured, non-zero (with the reason on stderr) when it could not.

    python bench/gpu_check.py env                    GPU, CUDA, torch, bitsandbytes; auto precision's choice and reason
    python bench/gpu_check.py train WORK STEPS       LoRA (float32 and auto) and QLoRA of SmolLM2, train.py against plain
                                                     TRL in the same run: tokens/s, trained tokens/s, peak GPU memory
    python bench/gpu_check.py same A/final B/final   the largest difference between two adapters (resume)
    python bench/gpu_check.py serve MODEL PORT LOG   chat.py --serve on MODEL (its output to LOG), asked once through
                                                     the `openai` client
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from bench.browser import stop_process  # noqa: E402
QUESTION = "我最近总是失眠，晚上躺在床上脑子停不下来，怎么办？"


def env() -> None:
    import torch

    from common.precision import resolve

    rows = {"torch": torch.__version__, "CUDA (torch built with)": torch.version.cuda,
            "CUDA available": torch.cuda.is_available(), "GPUs": torch.cuda.device_count()}
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        rows[f"GPU {i}"] = f"{p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}"
    if torch.cuda.is_available():
        rows["bf16 supported"] = torch.cuda.is_bf16_supported()
    try:
        import bitsandbytes

        rows["bitsandbytes"] = bitsandbytes.__version__
    except Exception as e:  # noqa: BLE001 - a broken install is a finding, not a crash
        rows["bitsandbytes"] = f"not importable: {e}"
    auto = resolve("auto")
    rows["auto precision"] = auto.reason
    table(rows)


def train(work: str, steps: str) -> None:
    """Each variant in a fresh process: our train.py (through bench/training.py's child, with the step timer) and the
    plain TRL script, both on the GPU, same data, packed rows of 512, batch 1, the first step a warm-up."""
    from training import MODEL, data_path, peer_job_args, run_child

    work, steps = Path(work), int(steps)
    work.mkdir(parents=True, exist_ok=True)
    result = work / "result.json"
    args = peer_job_args(work, steps, 512, data_path())
    ours = [sys.executable, str(ROOT / "bench" / "training.py"), "--child", str(result), "512", *args, "--force"]
    trl = [sys.executable, str(ROOT / "bench" / "trl_baseline.py"), str(MODEL), str(data_path()), "--max-steps",
           str(steps + 1), "--max-length", "512", "--timing", str(result), "--gpu"]
    variants = {
        "LoRA float32: train.py": ours,
        "LoRA float32: plain TRL": trl,
        "LoRA auto precision: train.py": [*ours, "model.dtype=auto"],
        "QLoRA (4-bit NF4, float32 compute): train.py": [*ours, "model.quantization=4bit"],
        "QLoRA (4-bit NF4, float32 compute): plain TRL": [*trl, "--4bit"],
    }
    environ = {**os.environ, "HF_DATASETS_CACHE": str(work / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    print("| run | tokens/s | trained tokens/s | peak GPU memory (MB) | losses |\n|---|---|---|---|---|")
    failed = []
    for name, cmd in variants.items():
        try:
            r = run_child(cmd, result, environ)
        except RuntimeError as e:
            failed.append(name)
            print(f"| {name} | failed: {str(e).splitlines()[0][:200]} | | | |")
            continue
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['trained_tokens_per_s']:.0f} | "
              f"{r.get('peak_gpu_mb', float('nan')):.0f} | {', '.join(f'{x:.3f}' for x in r['losses'][:4])} ... |")
    print(f"\n{steps} timed steps after a warm-up; data {data_path().name}; model {MODEL.name}.")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


def same(a: str, b: str) -> None:
    from safetensors.torch import load_file

    x, y = (load_file(str(Path(p) / "adapter_model.safetensors")) for p in (a, b))
    if x.keys() != y.keys():
        sys.exit(f"{a} and {b} hold different tensors")
    worst = max((x[k].float() - y[k].float()).abs().max().item() for k in x)
    table({"adapters compared": f"{a} vs {b}", "largest difference": f"{worst:.3g}",
           "equal (within 1e-5)": worst <= 1e-5})


def serve(model: str, port: str, log: str) -> None:
    """The public CLI only: chat.py --serve, then the official client, as a user would."""
    from openai import OpenAI

    log = open(log, "w")
    server = subprocess.Popen([sys.executable, str(ROOT / "chat.py"), model, "--serve", "--port", port],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                name = client.models.list().data[0].id
                break
            except Exception:  # noqa: BLE001 - not listening yet
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"the server did not come up (see {log.name})")
                time.sleep(1)
        start = time.perf_counter()
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": QUESTION}],
                                               max_tokens=64, temperature=0)
        seconds = time.perf_counter() - start
        answer = reply.choices[0].message.content
        table({"model": name, "question": QUESTION, "answer": answer.replace("\n", " ")[:300],
               "completion tokens": reply.usage.completion_tokens if reply.usage else "?",
               "seconds": f"{seconds:.2f}"})
        if not answer.strip():
            sys.exit("the server answered with empty text")
    finally:
        stop_process(server, seconds=30)


def table(rows: dict) -> None:
    print("| item | value |\n|---|---|")
    for key, value in rows.items():
        print(f"| {key} | {value} |")


if __name__ == "__main__":
    commands = {"env": env, "train": train, "same": same, "serve": serve}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    commands[sys.argv[1]](*sys.argv[2:])
