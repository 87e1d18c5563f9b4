"""Data at scale (issue 39): the encoding pinned to its hashes, streamed readers, preparation in several processes,
mixtures of sources with weights."""
import hashlib
import json
from pathlib import Path

import pytest

from common.cli import UserError
from common.formats import LoadReport, _records, _whole_records, load_conversations
from common.samples import encode_conversations
from common.templates import get_template
from tests.test_dry_run import run

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct"
SAMPLE = ROOT / "data" / "psych_sample.json"

# sha256 (first 16 hex digits) of the --dump-dataset lines of the first 16 sample conversations, SmolLM2's tokenizer,
# max_length 192, a default system prompt; recorded before preparation was batched (bench/dump_hashes.py records
# the full-size ones).
PINNED = {
    "qwen_chat/cut": "5eb551f725003f29", "qwen_chat/turns": "c7dfce66bd481fde", "qwen_chat/split": "6f825d996a11e68e",
    "chatglm2/cut": "a5c1de72c1486b62", "chatglm2/turns": "a56103b959386bb8", "chatglm2/split": "c3bc735d7455f3fa",
    "tokenizer/cut": "e57297be3a83e737", "tokenizer/turns": "08db7a60661b91cd", "tokenizer/split": "a770c621cb5941d8",
}


def dump_hash(rows) -> str:
    return hashlib.sha256("".join(json.dumps(row) + "\n" for row in rows).encode()).hexdigest()[:16]


def test_encoding_keeps_its_pinned_hashes():
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 not downloaded (make demo-model)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    conversations = load_conversations([str(SAMPLE)])[:16]
    got = {}
    for name in PINNED:
        template, mode = name.split("/")
        system = "你是一位心理咨询师。"
        rows, _ = encode_conversations(conversations, tokenizer, get_template(template), 192, mode, system)
        got[name] = dump_hash(rows)
    assert got == PINNED


def write_recipe(tmp_path, model_dir, data: str, extra: str = "") -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{path: {model_dir}}}\ndata: {{path: {data}, template: qwen_chat, max_length: 128}}\n"
                    f"{extra}", encoding="utf-8")
    return path


def test_two_processes_dump_what_one_does(tmp_path, tiny_model_dir):
    """The whole pipeline (streamed read, Arrow, map) in 1 and 2 processes, against the in-memory encoding."""
    from tests.conftest import build_tokenizer

    recipe = write_recipe(tmp_path, tiny_model_dir, SAMPLE, "train: {seed: 3}\n")
    dumps = []
    for procs in (1, 2):
        out = tmp_path / f"dump{procs}.jsonl"
        assert run(recipe, f"data.num_proc={procs}", "data.truncation=split", "--dump-dataset", out).returncode == 0
        dumps.append(out.read_text())
    rows, _ = encode_conversations(load_conversations([str(SAMPLE)]), build_tokenizer(), get_template("qwen_chat"),
                                   128, "split")
    assert dumps[0] == dumps[1] == "".join(json.dumps(row) + "\n" for row in rows)


def test_streamed_reader_reads_what_the_whole_file_reader_does(tmp_path):
    import common.formats as formats

    bom_crlf = tmp_path / "bom.json"
    bom_crlf.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"a": 1}, {"b": [1, 2.5, "x"]}, 7], indent=1).encode()
                         .replace(b"\n", b"\r\n"))
    lines = tmp_path / "lines.jsonl"
    lines.write_bytes(b'{"a": 1}\r\n\r\n{"b": 2}\r\nnot json\n')
    def comparable(records):  # BadRecord compares by identity: by its message here
        return [(label, r if isinstance(r, (dict, int)) else str(r)) for label, r in records]

    for path in (SAMPLE, ROOT / "data" / "psych_pairs.json", bom_crlf, lines):
        whole, streamed = LoadReport(), LoadReport()
        expected = comparable(_whole_records(path, whole))
        assert comparable(_records(path, streamed, stream_above=0)) == expected
        if path.suffix == ".json":  # records and numbers cut across reads
            assert comparable(formats._array_records(path, streamed, chunk=5)) == expected
        assert streamed.notes == whole.notes
    broken = tmp_path / "broken.json"
    broken.write_text('[{"conversation": []},\n {"conversation": }]')
    with pytest.raises(UserError, match=r"broken.json: line 2: not valid JSON \(Expecting value\)"):
        list(_records(broken, LoadReport(), 0))


def mixture(tmp_path, weights, extra_source=""):
    """Two sources: the 80 sample conversations in XTuner's format, and 30 of them written as OpenAI messages."""
    records = json.loads(SAMPLE.read_text(encoding="utf-8"))
    openai = [{"messages": [m for t in r["conversation"] for m in
                            ({"role": "user", "content": t["input"]}, {"role": "assistant", "content": t["output"]})]}
              for r in records[:30]]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in openai), encoding="utf-8")
    a, b = weights
    return (f"[{{path: {SAMPLE}, weight: {a}}}, {{path: {tmp_path / 'b.jsonl'}, weight: {b}, template: chatglm2, "
            f"truncation: cut}}{extra_source}]")


def test_a_mixture_is_drawn_to_its_shares_and_shows_them(tmp_path, tiny_model_dir):
    from common.dataset import build_datasets
    from common.modeling import recipe_tokenizer
    from common.recipe import load_recipe

    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir, mixture(tmp_path, (3, 1)), "train: {seed: 5}\n"),
                         ["data.eval_fraction=0.1"])
    rows, evals, stats = build_datasets(recipe, recipe_tokenizer(recipe), use_cache=False)
    # 72 and 27 conversations left after holding out 10% of each; 3:1 -> all 72 of the first, 24 of the second
    assert [s["conversations"] for s in stats["sources"]] == [72, 24] and stats["records"] == 96
    assert sum(s["samples"] for s in stats["sources"]) == stats["samples"] == len(rows)
    assert sum(s["trained_tokens"] for s in stats["sources"]) == stats["trained_tokens"]
    assert [s["conversations"] for s in stats["eval_sources"]] == [8, 3] and len(evals) >= 11
    # the second source is read as OpenAI messages and encoded with its own template (chatglm2's [Round 1])
    from common.templates import get_template as template

    again = build_datasets(recipe, recipe_tokenizer(recipe), use_cache=False)[0]
    assert again.to_list() == rows.to_list()  # the run's seed draws the same mixture
    assert any(template("chatglm2").prompt("", 1) .split("{")[0][:8] in recipe_tokenizer(recipe).decode(r["input_ids"])
               for r in rows.select(range(len(rows) - 5, len(rows))))
    result = run(write_recipe(tmp_path, tiny_model_dir, mixture(tmp_path, (3, 1))), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "mixture (realised shares):" in result.stdout and "b.jsonl" in result.stdout


def test_bad_mixture_entries_are_one_line_each_and_exit_2(tmp_path, tiny_model_dir):
    data = mixture(tmp_path, (1, 0), f", {{path: {tmp_path / 'missing.json'}, weight: 1, wieght: 2, format: xml}}")
    result = run(write_recipe(tmp_path, tiny_model_dir, data), "--dry-run")
    assert result.returncode == 2
    assert "`data.path[1].weight`: got 0, expected a share > 0" in result.stderr
    assert f"`data.path[2].path`: {tmp_path / 'missing.json'} does not exist" in result.stderr
    assert "unknown key `data.path[2].wieght` (did you mean `data.path[2].weight`?)" in result.stderr
    assert "`data.path[2].format`: train.method sft reads conversations in the formats" in result.stderr
    assert "Traceback" not in result.stderr
    # 1000:1 over 80 and 30 conversations: the second source's share is less than one conversation
    result = run(write_recipe(tmp_path, tiny_model_dir, mixture(tmp_path, (1000, 1))), "--dry-run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the shares cannot be met" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_templates_that_rewrite_history_and_thinking_in_the_batched_path(tmp_path, tiny_model_dir):
    """Preparation in batches and in 2 processes gives what the per-conversation encoder gives each source: a source
    on qwen3 (a template that rewrites history: one sample per trained turn) beside one on a table template, with
    data.thinking's rule (drop: the reasoning is not trained) and each source's own template."""
    from common.dataset import build_datasets
    from common.modeling import recipe_tokenizer
    from common.recipe import load_recipe

    records = json.loads(SAMPLE.read_text(encoding="utf-8"))[:12]
    messages = [{"messages": [m for t in r["conversation"] for m in (
        {"role": "user", "content": t["input"]},
        {"role": "assistant", "content": t["output"], "reasoning_content": "SECRET-REASONING"})]} for r in records]
    thought = tmp_path / "thought.jsonl"
    thought.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in messages), encoding="utf-8")
    data = f"[{{path: {thought}, template: qwen3}}, {{path: {SAMPLE}}}]"
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir, data), ["data.thinking=drop", "data.num_proc=2",
                                                                         "data.max_length=256"])
    tokenizer = recipe_tokenizer(recipe)
    rows, _, stats = build_datasets(recipe, tokenizer, use_cache=False)
    expected = []
    for path, name in ((thought, "qwen3"), (SAMPLE, "qwen_chat")):
        expected += encode_conversations(load_conversations([str(path)]), tokenizer, get_template(name, "drop"), 256,
                                         "split", thinking="drop")[0]
    assert rows.to_list() == expected
    turns = sum(len(r["conversation"]) for r in records)
    assert stats["rewritten_samples"] == turns > len(records)  # one sample per trained turn
    assert not any("SECRET-REASONING" in tokenizer.decode(r["input_ids"]) for r in expected)
