"""The `--dump-dataset` hashes that data preparation must keep (issue 39): the demo recipe, and qwen_chat / chatglm2 /
internlm2_chat x cut / turns / split on the shared counselling conversations with SmolLM2's tokenizer.

    python bench/dump_hashes.py [--data FILE] [--max-length N] [--out hashes.json]

Each dump runs train.py in a fresh process with an empty encoded-data cache, so the hash is of a cold preparation.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "models/SmolLM2-135M-Instruct"
TEMPLATES = ("qwen_chat", "chatglm2", "internlm2_chat")
MODES = ("cut", "turns", "split")


def cases(data: str, max_length: int) -> dict[str, list[str]]:
    out = {"demo": ["recipes/demo_smollm2.yaml"]}
    for template in TEMPLATES:
        for mode in MODES:
            out[f"{template}/{mode}"] = ["recipes/demo_smollm2.yaml", f"data.path={data}", "data.eval_path=null",
                                         f"data.template={template}", f"data.truncation={mode}",
                                         f"data.max_length={max_length}", f"model.path={MODEL}"]
    return out


def dump_hash(args: list[str], tmp: Path, extra: list[str] = ()) -> str:
    out = tmp / "dump.jsonl"
    out.unlink(missing_ok=True)
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "train.py", *args, *extra, "--dump-dataset", str(out)], cwd=ROOT, env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/work/shared/data/psych_multiturn.json")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--out")
    p.add_argument("extra", nargs="*", help="more overrides for every case, e.g. data.num_proc=2")
    a = p.parse_args()
    hashes = {}
    with tempfile.TemporaryDirectory(prefix="dump-hashes-") as tmp:
        for name, args in cases(a.data, a.max_length).items():
            hashes[name] = dump_hash(args, Path(tmp), a.extra)
            print(f"{name:<22} {hashes[name]}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(hashes, indent=1) + "\n")


if __name__ == "__main__":
    main()
