"""`train.py --dry-run` and `--dump-dataset`: the data path end to end, without loading model weights."""
import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    """train.py in-process (a subprocess would spend seconds importing torch): its exit code and output."""
    import train

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = train.main([str(a) for a in args]) or 0
        except SystemExit as e:
            code = e.code or 0
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def recipe(tmp_path, model_dir, data=ROOT / "data" / "psych_sample.json", extra=""):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{path: {model_dir}}}\ndata: {{path: {data}, template: qwen_chat, max_length: 256}}\n{extra}",
                    encoding="utf-8")
    return path


def test_dry_run_prints_stats_and_marked_preview(tmp_path, tiny_model_dir):
    out = run(recipe(tmp_path, tiny_model_dir), "--dry-run", "data.truncation=split")
    assert out.returncode == 0, out.stderr
    for field in ("records", "turns", "samples", "tokens", "trained tokens", "truncated", "dropped", "skipped",
                  "packed rows", "packing efficiency", "answer tokens trained", "lost to shortening"):
        assert field in out.stdout
    assert "records                           80" in out.stdout
    assert "<- recipe" in out.stdout and "split" in out.stdout
    # Not a TTY: trained spans as [[...]], starting right after the first assistant header.
    assert "<|im_start|>assistant\n[[" in out.stdout and "<|im_end|>]]" in out.stdout
    assert not list(tmp_path.glob("work_dirs")) and "Traceback" not in out.stderr


def test_dump_dataset_is_the_encoding_in_input_order(tmp_path, tiny_model_dir, tokenizer):
    from common.formats import load_conversations
    from common.templates import TEMPLATES

    dump = tmp_path / "rows.jsonl"
    out = run(recipe(tmp_path, tiny_model_dir), "--dump-dataset", dump, "data.max_length=4096")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    conversations = load_conversations([str(ROOT / "data" / "psych_sample.json")])
    assert len(rows) == len(conversations) == 80
    for row, turns in zip(rows, conversations):
        ids, labels = TEMPLATES["qwen_chat"].encode_ids(tokenizer, turns)
        assert row == {"input_ids": ids, "labels": labels}


def test_bad_recipe_one_block_exit_2(tmp_path, tiny_model_dir):
    out = run(recipe(tmp_path, tiny_model_dir, extra="train: {learning_rate: 1}\n"), "--dry-run",
              "data.template=qwen_cht")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "did you mean `train.lr`" in out.stderr and "did you mean `qwen_chat`" in out.stderr


def test_bad_record_one_line_exit_2_and_skip(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"conversation": [{"input": "你好", "output": "你好呀"}]}, ensure_ascii=False)
    bad.write_text(good + "\n" + json.dumps({"conversation": [{"input": "q", "output": ["x"]}]}) + "\n", encoding="utf-8")
    out = run(recipe(tmp_path, tiny_model_dir, data=bad), "--dry-run")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (f"error: {bad}: line 2: field conversation[0].output: expected a string, got list "
                                  "(set data.on_bad_record: skip to skip broken records)")
    out = run(recipe(tmp_path, tiny_model_dir, data=bad), "--dry-run", "data.on_bad_record=skip")
    assert out.returncode == 0 and "skipped 1 broken record(s)" in out.stderr and "records   " in out.stdout
