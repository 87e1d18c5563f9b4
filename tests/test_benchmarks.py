"""eval.py --tasks: lm-evaluation-harness on base and tuned, on the local multiple-choice task in
tests/fixtures/lm_eval_task (no hub): our loaded model with its adapter switched off and on scores exactly what
lm-eval's own loader (`pretrained=`, `peft=`) scores; bad task names and files are one line and exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_eval import call, make_run  # noqa: E402

TASK = ROOT / "tests" / "fixtures" / "lm_eval_task" / "facts_mc.yaml"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, tokenizer):
    root = tmp_path_factory.mktemp("bench_run")
    held_out = root / "held_out.json"
    held_out.write_text(json.dumps(json.loads((ROOT / "data" / "psych_heldout.json").read_text(encoding="utf-8"))[:2],
                                   ensure_ascii=False), encoding="utf-8")
    return make_run(root, tiny_model_dir, tokenizer, held_out)


def lm_eval_alone(pretrained, peft=None) -> dict:
    """The task's metrics as lm-eval computes them when it loads the model itself."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from common.benchmarks import task_file

    lm = HFLM(pretrained=str(pretrained), peft=str(peft) if peft else None, device="cpu", dtype="float32", batch_size=8)
    out = simple_evaluate(model=lm, tasks=[task_file(TASK)], task_manager=TaskManager(include_defaults=False),
                          log_samples=False, bootstrap_iters=1000)
    return out["results"]["facts_mc"]


def test_task_scores_side_by_side_equal_lm_evals_own_loading(run_dir, tiny_model_dir, capsys):
    code, out, err = call([run_dir, "--limit", "0", "--torch-dtype", "float32", "--tasks", TASK], capsys)
    assert code == 0, err
    report = json.loads((run_dir / "eval" / "report.json").read_text(encoding="utf-8"))
    bench = report["benchmarks"]
    assert bench["samples"]["facts_mc"] == 12 and bench["lm_eval"] == "0.4.13"
    scores = bench["tasks"]["facts_mc"]
    assert set(scores) == {"acc", "acc_norm"}
    base, tuned = lm_eval_alone(tiny_model_dir), lm_eval_alone(tiny_model_dir, run_dir / "final")
    for metric in ("acc", "acc_norm"):
        assert scores[metric]["base"] == base[f"{metric},none"]  # the adapter switched off is the base
        assert scores[metric]["tuned"] == tuned[f"{metric},none"]  # switched on is lm-eval's peft= load
        assert scores[metric]["tuned_stderr"] == pytest.approx(tuned[f"{metric}_stderr,none"])
    assert [base["acc,none"], tuned["acc,none"]] != [0.0, 0.0]  # answers were scored, not all missed
    md = (run_dir / "eval" / "report.md").read_text(encoding="utf-8")
    assert "## Benchmarks (lm-evaluation-harness 0.4.13)" in md and "| facts_mc | acc | 12 |" in md
    assert "benchmarks: facts_mc acc base" in out


def test_a_missing_task_file_is_one_line_before_anything_loads(tmp_path, capsys):
    # (An unknown task name is refused the same way, with the nearest name, but only after lm-eval has scanned its
    # 14,000 task files: a minute on the test machine, too long for the suite.)
    code, _, err = call([tmp_path / "no_run_here", "--tasks", "missing_task.yaml"], capsys)  # no model looked at
    assert code == 2 and "missing_task.yaml: no such task file" in err and len(err.strip().splitlines()) == 1, err


def test_a_task_file_without_a_task_name(tmp_path, capsys):
    bad = tmp_path / "group.yaml"
    bad.write_text("group: mine\ntask: [a, b]\n", encoding="utf-8")
    code, _, err = call([tmp_path / "no_run_here", "--tasks", bad], capsys)
    assert code == 2 and "needs a `task:` name" in err


def test_without_lm_eval_tasks_names_the_install(tmp_path):
    # A separate interpreter in which lm_eval cannot be imported (a None in sys.modules is how Python blocks one).
    code = ("import sys, runpy; sys.modules['lm_eval'] = None; sys.argv = ['eval.py', '--tasks', 'x']; "
            "runpy.run_path('eval.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: --tasks needs lm-evaluation-harness, which is not installed: "
                                   "pip install lm-eval==0.4.13")
