"""The conversation model (messages <-> turns, windows), data readers (four formats, messy real files) and the
three truncation modes."""
import json

import pytest

from common.cli import UserError
from common.conversation import BadRecord, Turn, messages_to_turns, turns_to_messages, window
from common.formats import LoadReport, load_conversations
from common.samples import Stats, encode_conversations, make_samples, packing_stats
from common.templates import IGNORE, TEMPLATES, get_template


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return str(path)


def load(path, fmt="auto", mode="error"):
    report = LoadReport()
    return load_conversations([path], fmt, mode, report), report


# ---------------------------------------------------------------- the conversation model

def test_messages_and_turns_convert_both_ways():
    turns = [Turn("q1", "a1", "S1"), Turn("q2", "a2"), Turn("q3", "a3", "S3"), Turn("q4", None)]
    messages = turns_to_messages(turns)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "system", "user",
                                             "assistant", "user"]
    assert messages_to_turns(messages, open_end=True) == turns
    assert messages_to_turns(messages) == turns[:3]  # training data: the unanswered user message is dropped
    with pytest.raises(BadRecord, match=r"field messages\[0\]\.role: unknown role 'bot'"):
        messages_to_turns([{"role": "bot", "content": "x"}])


def test_a_window_starts_with_the_conversations_system_prompt_unless_its_turn_has_its_own():
    turns = [Turn("q1", "a1", "S"), Turn("q2", "a2"), Turn("q3", "a3", "own"), Turn("q4", "a4")]
    assert window(turns, 0) == turns
    assert window(turns, 1, 2) == [Turn("q2", "a2", "S")]
    assert window(turns, 2) == turns[2:]
    assert window([Turn("q1", "a1"), Turn("q2", "a2")], 1) == [Turn("q2", "a2")]  # no system prompt: none added


# ---------------------------------------------------------------- formats

def test_xtuner_json_and_jsonl(tmp_path):
    records = [{"conversation": [{"system": "S", "input": "a", "output": "b"}, {"input": "c", "output": "d"}]},
               {"conversation": [{"input": None, "output": "e"}]}]
    for path in (write(tmp_path, "x.json", records),
                 write(tmp_path, "x.jsonl", "\n".join(json.dumps(r) for r in records) + "\n")):
        convs, _ = load(path)
        assert convs == [[Turn("a", "b", "S"), Turn("c", "d")], [Turn("", "e")]]


def test_alpaca(tmp_path):
    path = write(tmp_path, "a.json", [{"instruction": "问", "input": "补充", "output": "答"},
                                      {"instruction": "只有指令", "output": "答2"},
                                      {"instruction": "空输入", "input": "", "output": "答3"},
                                      {"instruction": "null 输入", "input": None, "output": "答4"},
                                      {"instruction": "x", "input": "", "output": "<nooutput>"}])
    convs, report = load(path)
    # XTuner 0.2.0's alpaca_map_fn: f"{instruction}\n{input}", so an empty input keeps the newline
    assert convs == [[Turn("问\n补充", "答")], [Turn("只有指令", "答2")], [Turn("空输入\n", "答3")],
                     [Turn("null 输入", "答4")]]
    assert report.dropped_empty == 1


def test_sharegpt(tmp_path):
    path = write(tmp_path, "s.json", [{"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"},
        {"from": "human", "value": ""}, {"from": "gpt", "value": "more"}, {"from": "human", "value": "繼續"}]}])
    convs, _ = load(path)
    assert convs == [[Turn("hi", "yo", "S"), Turn("", "more")]]  # empty human kept, trailing human dropped


def test_openai_quirks(tmp_path):
    path = write(tmp_path, "o.jsonl", json.dumps({"messages": [
        {"role": "assistant", "content": "leading, skipped"},
        {"role": "user", "content": "part1"}, {"role": "user", "content": "part2"},
        {"role": "assistant", "content": "A1", "loss": False},
        {"role": "system", "content": "SYS2"}, {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "A2"},
        {"role": "user", "content": "unanswered"}]}) + "\n")
    convs, _ = load(path)
    assert convs == [[Turn("part1part2", "A1", None, train=False), Turn("q2", "A2", "SYS2")]]


def test_auto_detect_mixes_formats_in_order(tmp_path):
    a = write(tmp_path, "a.json", [{"instruction": "i", "output": "o"}])
    x = write(tmp_path, "x.json", [{"conversation": [{"input": "q", "output": "r"}]}])
    assert load_conversations([x, a]) == [[Turn("q", "r")], [Turn("i", "o")]]


def test_default_system_only_where_missing(tokenizer):
    convs = [[Turn("q", "r")], [Turn("q", "r", system="own")]]
    rows, _ = encode_conversations(convs, tokenizer, TEMPLATES["qwen_chat"], 512, "cut", default_system="DEFAULT")
    texts = [tokenizer.decode(r["input_ids"]) for r in rows]
    assert "system\nDEFAULT" in texts[0] and "system\nown" in texts[1] and "DEFAULT" not in texts[1]


# ---------------------------------------------------------------- broken and odd records

BROKEN = {
    "missing output": ([{"conversation": [{"input": "q"}]}], "record 0: field conversation[0].output: missing"),
    "missing conversation": ([{"dialog": []}, {"conversation": [{"input": "q", "output": "r"}]}],
                             "record 0: field conversation: missing"),
    "empty output": ([{"conversation": [{"input": "q", "output": "  "}]}], "record 0: field conversation[0].output: empty"),
    "non-string content": ([{"conversation": [{"input": "q", "output": 42}]}],
                           "record 0: field conversation[0].output: expected a string, got int"),
    "turn not an object": ([{"conversation": ["q"]}], "record 0: field conversation[0]: expected an object"),
    "record not an object": ([{"conversation": [{"input": "q", "output": "r"}]}, "oops"],
                             "record 1: expected an object, got str"),
    "unknown role": ([{"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}]}],
                     "record 0: field messages[1].role: unknown role 'tool'"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_record_error_and_skip(tmp_path, case):
    records, message = BROKEN[case]
    good = {"conversation": [{"input": "ok", "output": "fine"}]} if "conversation" in json.dumps(records) else \
        {"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]}
    path = write(tmp_path, "bad.json", records + [good])
    with pytest.raises(UserError) as e:
        load(path)
    assert str(e.value).startswith(f"{path}: {message}")
    assert "\n" not in str(e.value)
    convs, report = load(path, mode="skip")
    assert len(report.skipped) == 1 and report.skipped[0].startswith(f"{path}: {message}")
    assert convs[-1][0].output == "fine"


def test_bad_jsonl_lines_are_records(tmp_path):
    good = json.dumps({"conversation": [{"input": "q", "output": "r"}]}).encode()
    path = write(tmp_path, "b.jsonl", good + b"\n{not json\n" + good.replace(b'"r"', b'"\xff"') + b"\n" + good + b"\n")
    with pytest.raises(UserError, match=r"b.jsonl: line 2: not valid JSON"):
        load(path)
    convs, report = load(path, mode="skip")
    assert len(convs) == 2 and len(report.skipped) == 2
    assert "line 3: not valid UTF-8" in report.skipped[1]


def test_invalid_utf8_json_file(tmp_path):
    path = write(tmp_path, "u.json", b'[{"conversation": [{"input": "q", "output": "\xc3\x28"}]}]')
    with pytest.raises(UserError, match=r"u.json: line 1: not valid UTF-8"):
        load(path)


def test_odd_but_usable_files_load_with_notes(tmp_path):
    record = {"conversation": [{"input": None, "output": "r"}]}
    bom_crlf = write(tmp_path, "bom.json", b"\xef\xbb\xbf" + json.dumps([record, {"conversation": []}], indent=1)
                     .replace("\n", "\r\n").encode())
    convs, report = load(bom_crlf)
    assert convs == [[Turn("", "r")]]
    assert any("byte-order mark" in n for n in report.notes) and any("CRLF" in n for n in report.notes)
    assert any("no answered turn" in n for n in report.notes)  # the empty conversation, dropped as XTuner does
    array_jsonl = write(tmp_path, "array.jsonl", json.dumps([record, record], indent=2))
    convs, report = load(array_jsonl)
    assert len(convs) == 2 and any("one JSON array" in n for n in report.notes)
    bare = write(tmp_path, "bare.json", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    convs, report = load(bare)
    assert convs == [[Turn("q", "a")]] and any("single object" in n for n in report.notes)


def test_file_level_errors(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        load(str(tmp_path / "none.json"))
    with pytest.raises(UserError, match="file is empty"):
        load(write(tmp_path, "e.json", ""))
    with pytest.raises(UserError, match="cannot tell the data format"):
        load(write(tmp_path, "f.json", [{"question": "q"}]))
    with pytest.raises(UserError, match="expected a list of records, got an object with keys foo"):
        load(write(tmp_path, "g.json", {"foo": 1}))
    with pytest.raises(UserError, match=r"line 1: not valid JSON"):
        load(write(tmp_path, "h.json", "[{"))


def test_real_shared_samples_load(tmp_path):
    from pathlib import Path

    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not shared.exists():
        pytest.skip("shared/data is not beside this checkout")
    for name, n in [("sample_alpaca.json", 200), ("sample_sharegpt.json", 200), ("sample_openai.jsonl", 41),
                    ("psych_multiturn.json", 2000)]:
        convs, _ = load(str(shared / name), mode="error")
        assert len(convs) == n, name


# ---------------------------------------------------------------- truncation modes

CONV = [Turn(f"问题{k}" * 3, f"回答{k}" * 6, system="系统提示" if k == 0 else None) for k in range(5)]


def seg_lengths(tokenizer, turns):
    return [len(s[0]) for s in TEMPLATES["qwen_chat"].encode(tokenizer, turns)]


def samples(tokenizer, turns, max_length, mode, template="qwen_chat"):
    stats = Stats()
    t = get_template(template)
    return make_samples(tokenizer, t, turns, max_length, mode, stats), stats


def trained_text(tokenizer, sample):
    ids, labels = sample
    return tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])


def test_cut_equals_foundation_encoding_truncated(tokenizer):
    ids, labels = TEMPLATES["qwen_chat"].encode_ids(tokenizer, CONV)
    out, stats = samples(tokenizer, CONV, 100, "cut")
    assert out == [(ids[:100], labels[:100])] and stats.truncated == 1


def test_cut_drops_sample_without_trained_token(tokenizer):
    first_prompt = len(TEMPLATES["qwen_chat"].encode_ids(tokenizer, [Turn(CONV[0].input, None, CONV[0].system)])[0])
    out, stats = samples(tokenizer, CONV, first_prompt, "cut")
    assert out == [] and stats.dropped == 1


def test_turns_keeps_whole_turns_from_the_start(tokenizer):
    lengths = seg_lengths(tokenizer, CONV)
    out, _ = samples(tokenizer, CONV, lengths[0] + lengths[1] + lengths[2] - 1, "turns")
    assert len(out) == 1 and len(out[0][0]) == lengths[0] + lengths[1]
    assert trained_text(tokenizer, out[0]) == "回答0" * 6 + "<|im_end|>" + "回答1" * 6 + "<|im_end|>"


def test_turns_shortens_a_first_turn_that_cannot_fit(tokenizer):
    long_turn = [Turn("很长的问题" * 30, "短回答" * 5), Turn("q", "a")]
    answer = len(tokenizer.encode("短回答" * 5 + "<|im_end|>", add_special_tokens=False))
    out, stats = samples(tokenizer, long_turn, answer + 10, "turns")
    assert len(out) == 1 and len(out[0][0]) == answer + 10
    assert out[0][0][0] == tokenizer.bos_token_id  # BOS kept, prompt cut from the left
    assert trained_text(tokenizer, out[0]) == "短回答" * 5 + "<|im_end|>" and stats.lost_to_shortening == 0
    out, stats = samples(tokenizer, long_turn, answer - 3, "turns")  # then the answer from the right
    assert len(out[0][0]) == answer - 3 and stats.lost_to_shortening > 0 and stats.dropped == 0


def test_split_windows_system_and_each_answer_once(tokenizer):
    lengths = seg_lengths(tokenizer, CONV)
    window = lengths[0] + lengths[1]
    out, stats = samples(tokenizer, CONV, window, "split")  # exactly the first two turns fit
    assert len(out[0][0]) == window
    texts = [tokenizer.decode(ids) for ids, _ in out]
    assert all(t.startswith("<s><|im_start|>system\n系统提示") for t in texts)  # system in every window
    answers = "".join(trained_text(tokenizer, s) for s in out)
    for k in range(5):
        assert answers.count("回答%d" % k * 6) == 1  # trained exactly once
    assert all(any(lab != IGNORE for lab in labels) for _, labels in out)  # no empty rows
    assert stats.trained_tokens == stats.answer_tokens and stats.samples == len(out)
    out2, _ = samples(tokenizer, CONV, window - 1, "split")  # one token less: the first window holds one turn
    assert "回答1" not in trained_text(tokenizer, out2[0])


def test_split_restarts_round_numbers(tokenizer):
    t = TEMPLATES["chatglm2"]
    out, _ = samples(tokenizer, CONV, len(t.encode_ids(tokenizer, CONV[:2])[0]), "split", template="chatglm2")
    texts = [tokenizer.decode(ids) for ids, _ in out]
    assert len(texts) > 1 and all(t.count("[Round 1]") == 1 and "系统提示" in t for t in texts)
    assert "[Round 2]" in texts[0]  # a window of several turns numbers them from 1


def test_split_with_tokenizer_chat_template(tokenizer):
    out, stats = samples(tokenizer, CONV, 90, "split", template="tokenizer")
    assert len(out) > 1 and stats.trained_tokens == stats.answer_tokens
    assert all(tokenizer.decode(ids).startswith("<|im_start|>system\n系统提示") for ids, _ in out)


def test_packing_split_samples(tokenizer):
    convs = [CONV, CONV[:2], CONV[:3]]
    rows, stats = encode_conversations(convs, tokenizer, TEMPLATES["qwen_chat"], 90, "split")
    n_rows, efficiency = packing_stats(rows, 300, False, 0)
    assert stats.samples == len(rows) > 3 and n_rows < len(rows) and 0 < efficiency <= 1


# ---------------------------------------------------------------- build_datasets: cache, eval split

def recipe_for(tmp_path, tiny_model_dir, *overrides):
    from common.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{path: {tiny_model_dir}}}\ndata: {{path: data/psych_sample.json, template: qwen_chat, "
                    f"max_length: 256}}\n", encoding="utf-8")
    return load_recipe(path, list(overrides))


def test_encoded_rows_are_cached(tmp_path, tiny_model_dir, tokenizer):
    import common.dataset as data

    recipe = recipe_for(tmp_path, tiny_model_dir, "data.max_length=241")  # a key of this test's own
    rows, _, stats = data.build_datasets(recipe, tokenizer)
    entries = list(data.cache_dir().glob("*/meta.json"))
    meta_file = data.cache_dir() / data._cache_key(recipe, tokenizer) / "meta.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    meta["stats"]["records"] += 1000  # a mark that only a read of the cache returns
    meta_file.write_text(json.dumps(meta), encoding="utf-8")
    rows2, _, stats2 = data.build_datasets(recipe, tokenizer)
    assert rows2.to_list() == rows.to_list() and stats2 == {**stats, "records": stats["records"] + 1000}
    recipe.data.max_length = 240  # any setting that changes the rows changes the key: encoded afresh
    _, _, stats3 = data.build_datasets(recipe, tokenizer)
    assert stats3["records"] == stats["records"]  # not the marked entry
    assert len(list(data.cache_dir().glob("*/meta.json"))) == len(entries) + 1


def test_outputs_appear_whole(tmp_path):
    from common import artifacts

    out = tmp_path / "loss.png"
    artifacts.write_text(out, "old")
    with pytest.raises(KeyboardInterrupt), artifacts.atomic_file(out) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path  # writers that pick the format by the suffix still can
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["loss.png"]
    with artifacts.atomic_file(out) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["loss.png"]
    # The data cache: a second process that encoded the same rows leaves the first one's entry as it is.
    for n in (1, 2):
        with artifacts.atomic_dir(tmp_path / "entry", replace=False) as tmp:
            (tmp / "meta.json").write_text(str(n))
    assert (tmp_path / "entry" / "meta.json").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry", "loss.png"]


def test_eval_fraction_holds_out_conversations(tmp_path, tiny_model_dir, tokenizer):
    from common.dataset import build_datasets

    train, evals, stats = build_datasets(recipe_for(tmp_path, tiny_model_dir, "data.eval_fraction=0.25", "data.max_length=4096"), tokenizer)
    assert stats["records"] == 60 and len(evals) == 20 and len(train) == 60
