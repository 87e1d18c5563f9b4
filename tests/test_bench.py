"""`bench/run.py --quick` runs every benchmark end to end (shrunk: one round, one timed step, a 13M-parameter merge,
each child's script in the bench's own process: bench/children.py) and writes a results file whose table covers the
six figures. The figures are measurements of a shared machine, not properties of the code, so no value is asserted;
but every one must be a measurement: finite and positive."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.training import MODEL  # noqa: E402


def figures(results: dict):
    """(what, value) for every number the bench reports: the table's ours / baseline / ratio, and the matmul
    ceilings it measured on this machine."""
    for row in results["table"]:
        for key in ("ours", "baseline", "ratio"):
            value = row[key]
            if value == "":  # a figure without a baseline or a ratio
                continue
            if isinstance(value, str):  # "0.9860 (1.40%)": packing efficiency (padding share, which may be 0)
                value = float(value.split()[0])
            yield f"{row['item']}: {key}", value
    for dtype in ("float32", "bfloat16"):
        for key, value in results["machine"][dtype].items():
            yield f"machine {dtype} {key}", value


@pytest.mark.skipif(not (MODEL / "config.json").exists(), reason="run `make demo-model` first (the bench trains it)")
def test_bench_quick_runs_and_reports_every_item(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "bench/run.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text(encoding="utf-8"))
    items = {row["item"].split(" ")[0] for row in results["table"]}
    assert items == {"1", "2", "3", "4", "5", "6"}
    runs = results["training"]["runs"]
    for name in ("train.py", "TRL SFTTrainer (plain script)"):
        assert runs[name]["tokens_per_s"] > 0 and runs[name]["trained_tokens_per_step"] > 0
        assert runs[name]["peak_rss_mb"] > 100
    reported = list(figures(results))
    assert len(reported) >= 2 * len(results["table"])
    for what, value in reported:
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (what, value)
    assert results["chat"]["same_tokens"]  # both generation paths produced the same answer
    serving = results["serving"]["runs"]
    assert [r["2"]["requests"] for r in serving.values()] == [2, 2]  # both servers answered every request
    # --quick reads the first 100 conversations of the bench's data: ../shared/data where it exists, else data/
    from bench.training import data_path

    expected = min(100, len(json.loads(data_path().read_text(encoding="utf-8"))))
    assert results["dataprep"]["records"] == expected and results["dataprep"]["data"] == str(data_path())
    assert "1 training: trained (labelled) tokens/s" in proc.stdout


def test_gpu_check_script_parses_and_its_environment_step_runs():
    """bench/gpu_check.sh has not run on a GPU here: CI checks that it and the Python it runs parse, and runs the one
    step that needs no GPU (its environment report, which must say what this machine is)."""
    assert subprocess.run(["bash", "-n", "bench/gpu_check.sh"], cwd=ROOT).returncode == 0
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    python = sorted({word for word in script.split() if word.startswith("bench/") and word.endswith(".py")})
    assert python == ["bench/gpu_check.py"]
    for path in ["bench/gpu_check.py", "bench/training.py", "bench/trl_baseline.py", "bench/steptimer.py"]:
        proc = subprocess.run([sys.executable, "-m", "py_compile", path], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "env"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import torch

    assert f"| torch | {torch.__version__} |" in proc.stdout
    assert f"| CUDA available | {torch.cuda.is_available()} |" in proc.stdout and "| auto precision |" in proc.stdout
