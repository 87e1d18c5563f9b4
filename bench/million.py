"""A million conversations (issue 39): generate a file of N conversations from the shared ones, then prepare it cold
(read, encode, cache) in a child process and report the time and peak RSS. The generated file is not committed.

    python bench/million.py make OUT.jsonl [--count 1000000] [--json]     # OUT.json with --json: one JSON array
    python bench/million.py measure FILE [--num-proc 2]

Each generated conversation is a shared one with its first question numbered, so that no two are the same text (a
repeated text would be tokenized once per batch and flatter the figures).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.training import MODEL, data_path  # noqa: E402


def make(out: Path, count: int, as_array: bool) -> None:
    records = json.loads(data_path().read_text(encoding="utf-8"))
    with open(out, "w", encoding="utf-8") as f:
        f.write("[\n" if as_array else "")
        for n in range(count):
            record = json.loads(json.dumps(records[n % len(records)]))
            record["conversation"][0]["input"] = f"({n}) " + record["conversation"][0]["input"]
            line = json.dumps(record, ensure_ascii=False)
            f.write(line + (",\n" if as_array and n < count - 1 else "\n"))
        f.write("]\n" if as_array else "")
    print(f"wrote {count:,} conversations ({out.stat().st_size / 1e9:.2f} GB) to {out}")


def _tree_anon_kb(root: int) -> int:
    """RssAnon summed over a process and all its descendants (Linux /proc)."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("RssAnon:")), 0)
        todo += [int(c) for c in children]
    return total


def measure(data: Path, num_proc: int) -> dict:
    """train.py --dry-run, cold (a fresh encoded-data cache): read, encode and cache all conversations, count the
    packed rows, compare the truncation modes on the first 5,000; wall time and the largest peak RSS of train.py and
    its encoding workers."""
    with tempfile.TemporaryDirectory(prefix="million-") as tmp:
        env = {**os.environ, "HF_DATASETS_CACHE": str(Path(tmp) / "cache")}
        args = [sys.executable, "train.py", "recipes/demo_smollm2.yaml", f"data.path={data}", "data.eval_path=null",
                "data.template=qwen_chat", "data.max_length=2048", f"data.num_proc={num_proc}", f"model.path={MODEL}"]
        args.append("--dry-run")
        wrapper = ("import resource, subprocess, sys, json; p = subprocess.run(sys.argv[1:]); "
                   "print(json.dumps({'rc': p.returncode, 'peak_kb': "
                   "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
        start = time.perf_counter()
        # RUSAGE_CHILDREN's ru_maxrss: the largest peak of train.py and its (waited-for) encoding workers. It counts
        # the pages of the memory-mapped Arrow files read, which the kernel can drop: the anonymous memory of the
        # whole process tree (RssAnon, sampled every 0.2 s) is what the data's size must not drive.
        child = subprocess.Popen([sys.executable, "-c", wrapper, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        peak_anon = 0
        while child.poll() is None:
            peak_anon = max(peak_anon, _tree_anon_kb(child.pid))
            time.sleep(0.2)
        stdout, stderr = child.communicate()
        out = subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
        seconds = time.perf_counter() - start
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        if figures["rc"] != 0:
            raise SystemExit(out.stderr[-3000:])
        print(out.stdout[-2500:], file=sys.stderr)
        return {"file": str(data), "bytes": data.stat().st_size, "num_proc": num_proc,
                "seconds": round(seconds, 1), "peak_rss_mb_largest_process": round(figures["peak_kb"] / 1024),
                "peak_anon_mb_all_processes": round(peak_anon / 1024),
                "cpus": os.cpu_count(), "load_avg_after": os.getloadavg()}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("out", type=Path)
    m.add_argument("--count", type=int, default=1_000_000)
    m.add_argument("--json", action="store_true")
    r = sub.add_parser("measure")
    r.add_argument("file", type=Path)
    r.add_argument("--num-proc", type=int, default=2)
    a = p.parse_args()
    if a.cmd == "make":
        make(a.out, a.count, a.json)
    else:
        print(json.dumps(measure(a.file, a.num_proc), indent=1))
