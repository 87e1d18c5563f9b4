"""`bench/run.py --quick` runs every benchmark end to end (shrunk: one round, one timed step, a 13M-parameter merge)
and writes a results file whose table covers the five figures. The figures themselves are not asserted: they are
measurements of a shared machine, not properties of the code."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def test_bench_quick_runs_and_reports_every_item(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "bench/run.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text(encoding="utf-8"))
    items = {row["item"].split(" ")[0] for row in results["table"]}
    assert items == {"1", "2", "3", "4", "5"}
    runs = results["training"]["runs"]
    for name in ("train.py", "TRL SFTTrainer (plain script)"):
        assert runs[name]["tokens_per_s"] > 0 and runs[name]["trained_tokens_per_step"] > 0
        assert runs[name]["peak_rss_mb"] > 100
    assert results["chat"]["same_tokens"]  # both generation paths produced the same answer
    # --quick reads the first 100 conversations of the bench's data: ../shared/data where it exists, else data/
    from bench.training import data_path

    expected = min(100, len(json.loads(data_path().read_text(encoding="utf-8"))))
    assert results["dataprep"]["records"] == expected and results["dataprep"]["data"] == str(data_path())
    assert "1 training: trained (labelled) tokens/s" in proc.stdout
