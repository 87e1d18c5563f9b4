"""The method table (common/methods): every `data.format` of every method through `train.py --dry-run` (read, or one
problem and exit 2 naming the formats the method reads), the issue's two defects, and the recipe checks that come
from the method modules."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.methods.table import METHODS  # noqa: E402
from test_dry_run import run  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
# One small file per (kind of data, format): the layouts as the peers write them. A method's format without a file
# here fails the test below.
SAMPLES = {
    ("conversations", "xtuner"): ROOT / "data" / "psych_sample.json",
    ("conversations", "alpaca"): [{"instruction": "我睡不着", "input": "", "output": "先说说最近发生了什么？"}],
    ("conversations", "sharegpt"): [{"conversations": [{"from": "human", "value": "我睡不着"},
                                                       {"from": "gpt", "value": "先说说最近发生了什么？"}]}],
    ("conversations", "openai"): [{"messages": [{"role": "user", "content": "我睡不着"},
                                                {"role": "assistant", "content": "先说说最近发生了什么？"}]}],
    ("pairs", "conversational"): FIXTURES / "pairs_conversational.jsonl",
    ("pairs", "plain"): FIXTURES / "pairs_trl_plain.json",
    ("pairs", "sharegpt"): FIXTURES / "pairs_llamafactory_sharegpt.json",
    ("pairs", "alpaca"): FIXTURES / "pairs_llamafactory_alpaca.json",
    ("rated answers", "conversational"): ROOT / "data" / "psych_kto.json",
    ("rated answers", "plain"): [{"prompt": "我睡不着", "completion": "先说说最近发生了什么？", "label": True},
                                 {"prompt": "我睡不着", "completion": "别想太多。", "label": False}],
    ("rated answers", "sharegpt"): [{"messages": [{"role": "user", "content": "我睡不着"},
                                                  {"role": "assistant", "content": "先说说最近发生了什么？"}],
                                     "label": True},
                                    {"conversations": [{"from": "human", "value": "我睡不着"},
                                                       {"from": "gpt", "value": "别想太多。"}], "kto_tag": False}],
}
# grpo's prompts: each user turn of a conversation, a pair's prompt, prompt-only records
SAMPLES.update({("prompts", fmt): SAMPLES[("conversations", fmt)]
                for fmt in ("xtuner", "alpaca", "sharegpt", "openai")})
SAMPLES.update({("prompts", fmt): SAMPLES[("pairs", fmt)] for fmt in ("conversational", "plain")})
SAMPLES[("prompts", "prompt")] = [{"prompt": "我睡不着"}, {"prompt": [{"role": "user", "content": "我很焦虑"}]}]
# what a method needs beside its data for a dry run: GRPO learns from rewards, in groups that fill the batch
EXTRA = {"grpo": "grpo: {num_generations: 2, max_completion_length: 16}\nrewards:\n  - repetition: {}\n"}
ALL_FORMATS = sorted({f for m in METHODS.values() for f in m.formats})


def data_file(tmp_path, kind: str, fmt: str) -> Path:
    sample = SAMPLES[(kind, fmt)]
    if isinstance(sample, Path):
        return sample
    path = tmp_path / f"{fmt}.json"
    path.write_text(json.dumps(sample, ensure_ascii=False), encoding="utf-8")
    return path


def recipe(tmp_path, model_dir, method: str, data: Path, fmt: str) -> Path:
    path = tmp_path / "r.yaml"
    pack = "true" if METHODS[method].packs else "false"
    path.write_text(f"model: {{path: {model_dir}}}\n"
                    f"data: {{path: {data}, format: {fmt}, max_length: 512, pack: {pack}}}\n"
                    f"train: {{method: {method}, batch_size: 2}}\n" + EXTRA.get(method, ""), encoding="utf-8")
    return path


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_every_format_of_every_method(tmp_path, tiny_model_dir, method, fmt):
    m = METHODS[method]
    if fmt in m.formats:
        out = run(recipe(tmp_path, tiny_model_dir, method, data_file(tmp_path, m.kind, fmt), fmt), "--dry-run")
        assert out.returncode == 0, out.stderr
        assert "records" in out.stdout and "[[" in out.stdout  # its statistics and the first row, trained span marked
    else:
        # a file the method could read: only the format is wrong
        out = run(recipe(tmp_path, tiny_model_dir, method, data_file(tmp_path, m.kind, m.formats[0]), fmt), "--dry-run")
        assert out.returncode == 2 and "Traceback" not in out.stderr
        problems = [line for line in out.stderr.splitlines() if line.startswith("  - ")]
        assert problems == [f"  - `data.format`: train.method {method} reads {m.kind} in the formats "
                            f"{', '.join(m.formats)} (or auto), not `{fmt}`"]


def test_the_issue_commands_on_the_dpo_recipe(tmp_path, tiny_model_dir):
    """`data.format=conversational` is read (the layout the docs name for pairs); `data.format=xtuner` is a recipe
    problem, not a KeyError."""
    recipe = ROOT / "recipes" / "psych_dpo.yaml"
    base = [f"model.path={tiny_model_dir}", f"train.output_dir={tmp_path / 'run'}"]
    out = run(recipe, *base, "data.format=conversational", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "pairs  " in out.stdout
    out = run(recipe, *base, "data.format=xtuner", "--dry-run")
    assert out.returncode == 2 and "KeyError" not in out.stderr
    assert ("`data.format`: train.method dpo reads pairs in the formats conversational, plain, sharegpt, alpaca"
            in out.stderr)


def test_an_unknown_method_is_a_recipe_problem_with_the_nearest_name(tmp_path, tiny_model_dir):
    out = run(recipe(tmp_path, tiny_model_dir, "dpo", SAMPLES[("pairs", "plain")], "auto"), "train.method=dpx",
              "data.format=xtuner", "preference.betta=1", "--dry-run")
    assert out.returncode == 2
    assert f"unknown method `dpx` (one of: {', '.join(METHODS)}) (did you mean `dpo`?)" in out.stderr
    assert "unknown key `preference.betta`" in out.stderr  # collected with the other problems
