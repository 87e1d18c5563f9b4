"""tests/tools.py: a test that needs a missing system tool skips on a laptop and fails under CI=true."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_pytest(tmp_path, ci: str | None):
    test = tmp_path / "test_needs_a_tool.py"
    test.write_text("from tests.tools import require_tool\n\n\ndef test_it():\n    require_tool('no frobnicator here')\n"
                    "\n\ndef test_present():\n    require_tool(None)\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(ROOT)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(test)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_missing_tool_skips_on_a_laptop_and_fails_in_ci(tmp_path):
    laptop = run_pytest(tmp_path, None)
    assert laptop.returncode == 0 and "1 passed, 1 skipped" in laptop.stdout and "no frobnicator here" in laptop.stdout
    ci = run_pytest(tmp_path, "true")
    assert ci.returncode == 1 and "1 failed, 1 passed" in ci.stdout, ci.stdout
    assert "no frobnicator here (CI=true: .ci/run installs it" in ci.stdout
