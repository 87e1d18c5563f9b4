"""chat.py, common/repl.py and the generation core on a tiny random llama: prompts equal training's, stop words and EOS are never
shown, the history is trimmed to the budget, piped and --once modes, run-directory resolution."""
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import chat
from common import artifacts, generation, repl
from common.cli import UserError
from common.formats import load_conversations
from common.generation import Generator, Sampling
from common.modeling import load_for_generation
from common.recipe import DataConfig, EvaluationConfig, ModelConfig, Recipe, save_recipe
from common.samples import encode_conversations
from common.templates import IGNORE, get_template, system_from_template

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "你是一位心理咨询师。"


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_for_generation(artifacts.resolve_model(str(tiny_model_dir)))


def session(loaded, template="qwen_chat", max_length=512, system=None, extra_stop_words=(), **sampling):
    model, tokenizer = loaded
    sampling.setdefault("max_new_tokens", 16)
    generator = Generator(model, tokenizer, get_template(template), max_length, list(extra_stop_words))
    return repl.ChatSession(generator, Sampling(**sampling), system)


def history(pairs):
    """(user, answer) pairs as the session keeps them: messages."""
    return [m for user, answer in pairs for m in ({"role": "user", "content": user}, {"role": "assistant", "content": answer})]


def prompt_ids(chat_session, message):
    messages, dropped = chat_session.fit(message)
    return chat_session.generator.prompt_ids(messages), dropped


@pytest.fixture(scope="module")
def conversations():
    return [c for c in load_conversations([str(ROOT / "data" / "psych_sample.json")]) if len(c) >= 3][:6]


def answer_start(labels):
    """Index of the last answer's first token in a training row: where its final run of trained labels begins."""
    end = max(i for i, label in enumerate(labels) if label != IGNORE)
    while end > 0 and labels[end - 1] != IGNORE:
        end -= 1
    return end


def greedy_ids(chat_session, message):
    """The answer ids generate() produces for message, without our stopping criterion."""
    ids, _ = prompt_ids(chat_session, message)
    g = chat_session.generator
    out = g.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           generation_config=g.generation_config(chat_session.sampling))
    return out[0, len(ids):].tolist()


# ---------------------------------------------------------------- rendering = training

@pytest.mark.parametrize("template", ["qwen_chat", "internlm2_chat", "llama2_chat", "chatglm3", "tokenizer"])
def test_prompt_is_the_prompt_part_of_the_training_encoding(loaded, conversations, template):
    _, tokenizer = loaded
    # Training's own path (data.encode_conversations, default system applied as train.py does), one row per
    # conversation; the chat, fed the same history, must produce that row up to where the last answer starts.
    rows, _ = encode_conversations(conversations, tokenizer, get_template(template), 100_000, "split", default_system=SYSTEM)
    assert len(rows) == len(conversations)
    for turns, row in zip(conversations, rows):
        s = session(loaded, template, max_length=100_000, system=turns[0].system or SYSTEM)
        s.history = history((t.input, t.output) for t in turns[:-1])
        ids, dropped = prompt_ids(s, turns[-1].input)
        assert dropped == 0
        assert ids == row["input_ids"][: answer_start(row["labels"])]


def test_trimming_drops_oldest_turns_and_keeps_the_system_as_training_windows_do(loaded, conversations):
    _, tokenizer = loaded
    turns = max(conversations, key=len)
    s = session(loaded, max_length=260, max_new_tokens=60, system=SYSTEM)
    s.history = history((t.input, t.output) for t in turns[:-1])
    before = len(s.history)
    ids, dropped = prompt_ids(s, turns[-1].input)
    assert dropped >= 1 and len(s.history) == before - 2 * dropped
    assert len(ids) <= s.budget == 200
    # Kept turns are the newest, with the system prompt moved onto the first of them (training's `split` windows).
    kept = turns[dropped:]
    assert s.history == history((t.input, t.output) for t in kept[:-1])
    row = encode_conversations([kept], tokenizer, get_template("qwen_chat"), 100_000, "split", default_system=SYSTEM)[0][0]
    assert ids == row["input_ids"][: answer_start(row["labels"])]
    # One more dropped turn would also fit, so exactly the minimum was dropped.
    s.history = history((t.input, t.output) for t in turns[dropped - 1:-1])
    assert prompt_ids(s, turns[-1].input)[1] == 1


def test_a_prompt_that_cannot_fit_is_refused_by_its_length_before_it_is_tokenized(loaded):
    s = session(loaded, max_length=120, max_new_tokens=20, temperature=0)
    longest = s.generator.longest_token
    assert longest == max(len(piece) for piece in loaded[1].get_vocab())
    with pytest.raises(generation.PromptTooLong, match=f"has {100 * longest + 1} characters, at least 101 tokens"):
        s.generator.start([{"role": "user", "content": "x" * (100 * longest + 1)}], s.sampling)
    # Within the bound, the exact count decides (a template adds tokens of its own).
    with pytest.raises(generation.PromptTooLong, match="tokens with the template, more than the 100"):
        s.generator.start([{"role": "user", "content": "焦虑" * 100}], s.sampling)


def test_reply_reports_dropped_turns_and_a_message_alone_too_long_is_refused(loaded):
    s = session(loaded, max_length=120, max_new_tokens=20, temperature=0)
    s.history = history([("我最近很焦虑" * 5, "听起来你压力很大" * 5)] * 3)
    reply = s.reply("你好")
    assert reply.dropped >= 1 and s.history[-2:] == history([("你好", reply.text)])
    kept = list(s.history)
    with pytest.raises(generation.PromptTooLong, match="more than the 100 the context allows"):
        s.reply("焦虑" * 200)
    assert s.history == kept  # a refused message costs no history
    with pytest.raises(UserError, match="leaves no room"):
        session(loaded, max_length=64, max_new_tokens=64)


# ---------------------------------------------------------------- stop words and EOS

def feed_one_by_one(tokenizer, text, stop_words):
    chunks = []
    stream = generation.StopWordStream(tokenizer, stop_words, {tokenizer.eos_token_id}, chunks.append)
    ids = tokenizer.encode(text, add_special_tokens=False)
    for n in range(1, len(ids) + 1):
        stream.feed(ids[:n])
        shown = "".join(chunks)
        assert "\ufffd" not in shown  # half a UTF-8 character is never printed
        assert not any(w in shown for w in stop_words)
    stream.finish()
    return stream, chunks


def test_stop_words_spanning_several_tokens_are_never_shown(tokenizer):
    assert len(tokenizer.encode("\n\nUser:", add_special_tokens=False)) > 2
    stream, chunks = feed_one_by_one(tokenizer, "你好🙂\n\nUser: 不该出现", ["\n\nUser:", "<|im_end|>"])
    assert stream.stopped and "".join(chunks) == stream.answer == "你好🙂"
    stream, chunks = feed_one_by_one(tokenizer, "先说<|im_end|>后面", ["\n\nUser:", "<|im_end|>"])
    assert "".join(chunks) == "先说"
    # A prefix of a stop word that never completes is held back, then shown: at the end, or once it is resolved.
    stream, chunks = feed_one_by_one(tokenizer, "ok\n\nUse it", ["\n\nUser:"])
    assert not stream.stopped and "".join(chunks) == "ok\n\nUse it"
    stream, chunks = feed_one_by_one(tokenizer, "ok\n\nUse", ["\n\nUser:"])
    assert chunks[-1].endswith("\n\nUse") and "".join(chunks) == "ok\n\nUse"


def clean_pair(tokenizer, ids):
    """A position j where two generated tokens decode to clean text that first occurs there."""
    full = tokenizer.decode(ids, skip_special_tokens=False)
    for j in range(1, len(ids) - 1):
        word = tokenizer.decode(ids[j:j + 2], skip_special_tokens=False)
        before = tokenizer.decode(ids[:j], skip_special_tokens=False)
        if len(word) >= 2 and "\ufffd" not in word + before and full.find(word) == len(before):
            return j, word, before
    raise AssertionError(f"no clean two-token stop word in {full!r}")


@pytest.fixture
def whole_characters_only(loaded):
    """A random model mostly emits byte fragments of characters; to have clean multi-token text to stop on
    (whatever the in-process tokenizer's merges came out as), generation may only pick tokens that decode whole."""
    model, tokenizer = loaded
    fragments = [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i]) or not tokenizer.decode([i]).strip()]
    saved = model.generation_config.suppress_tokens
    model.generation_config.suppress_tokens = fragments
    yield
    model.generation_config.suppress_tokens = saved


def test_generation_stops_at_a_multi_token_stop_word_and_hides_it(loaded, whole_characters_only):
    _, tokenizer = loaded
    s = session(loaded, temperature=0, max_new_tokens=40)
    s.history = history([("你好", "你好，我在听。")])
    ids = greedy_ids(s, "我最近很焦虑")
    j, word, before = clean_pair(tokenizer, ids)
    s = session(loaded, temperature=0, max_new_tokens=40, extra_stop_words=[word])
    s.history = history([("你好", "你好，我在听。")])
    chunks = []
    reply = s.reply("我最近很焦虑", chunks.append)
    assert reply.text == "".join(chunks) == before and word not in reply.text


def test_generation_stops_at_eos_ids_from_generation_config_and_hides_them(loaded):
    model, tokenizer = loaded
    s = session(loaded, temperature=0, max_new_tokens=40)
    ids = greedy_ids(s, "我最近很焦虑")
    j = next(n for n in range(2, len(ids)) if ids[n] not in ids[:n])
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, ids[j]]  # a chat model listing two EOS ids
    try:
        s = session(loaded, temperature=0, max_new_tokens=40)
        reply = s.reply("我最近很焦虑")
    finally:
        model.generation_config.eos_token_id = saved
    assert reply.text == tokenizer.decode(ids[:j], skip_special_tokens=False)


def test_temperature_zero_is_greedy_and_repeatable(loaded):
    s = session(loaded, temperature=0, max_new_tokens=12)
    assert s.generator.generation_config(s.sampling).do_sample is False
    first = s.reply("你好")
    assert first.cut and not first.interrupted  # 12 tokens, no stop word or EOS: reported as cut
    s.reset()
    assert s.reply("你好").text == first.text
    sampled = session(loaded, temperature=0.7, top_k=40, top_p=0.9)
    sampled = sampled.generator.generation_config(sampled.sampling)
    assert (sampled.do_sample, sampled.temperature, sampled.top_k, sampled.top_p) == (True, 0.7, 40, 0.9)


def test_ctrl_c_stops_the_answer_and_keeps_what_was_shown(loaded, whole_characters_only):
    s = session(loaded, temperature=0, max_new_tokens=40)
    s.history = history([("你好", "你好，我在听。")])
    full = s.reply("我最近很焦虑").text
    s.history = history([("你好", "你好，我在听。")])
    shown = []

    def interrupt_after_first(text):  # Ctrl-C arriving while the answer streams
        shown.append(text)
        raise KeyboardInterrupt

    reply = s.reply("我最近很焦虑", interrupt_after_first)
    assert reply.interrupted and reply.text == shown[0] and len(reply.text) < len(full)
    assert s.history[-2:] == history([("我最近很焦虑", shown[0])])
    assert s.reply("你好").text  # the session goes on


# ---------------------------------------------------------------- the script

def run_main(monkeypatch, capsys, argv, stdin=""):
    code = 0
    try:
        chat.main(argv, stdin=io.StringIO(stdin))  # StringIO.isatty() is False: piped mode
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_piped_mode_is_a_plain_multi_turn_conversation(loaded, tiny_model_dir, monkeypatch, capsys):
    args = [str(tiny_model_dir), "--prompt-template", "qwen_chat", "--system", SYSTEM, "--temperature", "0",
            "--max-new-tokens", "12", "--stop-words", "\n"]
    code, out, err = run_main(monkeypatch, capsys, args, "你好\n\n我最近\\\n很焦虑\n/reset\n你好\n")
    assert code == 0, err
    # chat.py's prompt cache is on: the second turn starts from the first's positions and the third (after /reset)
    # is the first prompt kept whole; these expected answers come from a generator without one
    s = session(loaded, system=SYSTEM, temperature=0, max_new_tokens=12, extra_stop_words=["\n"])
    assert not s.generator.prompts
    first, second = s.reply("你好").text, s.reply("我最近\n很焦虑").text  # a trailing \ joins two lines
    assert out == f"{first}\n{second}\n{first}\n"  # /reset: the third answer starts a new conversation
    assert ">>>" not in out + err and "\033[" not in out + err
    assert "history cleared" in err


def test_once_answers_and_exits(loaded, tiny_model_dir, monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, [str(tiny_model_dir), "--prompt-template", "qwen_chat", "--once",
                                                  "你好", "--temperature", "0", "--max-new-tokens", "8", "--no-stream"],
                            stdin="这一行不会被读\n")
    assert code == 0
    assert out == session(loaded, temperature=0, max_new_tokens=8).reply("你好").text + "\n"


def test_piped_subprocess_reports_trimming_on_stderr(tiny_model_dir):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "chat.py"), str(tiny_model_dir), "--prompt-template", "qwen_chat",
         "--max-length", "80", "--max-new-tokens", "30", "--temperature", "0"],
        input="我最近很焦虑，晚上睡不着\n白天也没有精神\n怎么办\n", capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "dropped the 1 oldest turn" in proc.stderr or "dropped the 2 oldest turns" in proc.stderr
    assert ">>>" not in proc.stdout


@pytest.mark.parametrize("argv, message", [
    (["/nonexistent/model"], "/nonexistent/model: no such model directory"),
    (["TINY", "--prompt-template", "qwen_caht"], "unknown template `qwen_caht` (did you mean `qwen_chat`?)"),
    (["TINY", "--system-template", "lawyr"], "unknown system template `lawyr` (did you mean `lawyer`?)"),
    (["TINY", "--adapter", "TINY"], "no adapter_config.json there"),
    (["TINY", "--max-new-tokens", "5000"], "leaves no room for the prompt in a context of 1024 tokens"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_model_dir, monkeypatch, capsys, argv, message):
    argv = [str(tiny_model_dir) if a == "TINY" else a for a in argv]
    code, out, err = run_main(monkeypatch, capsys, argv + ["--once", "你好"])
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["-1", "inf", "nan"])
def test_a_prompt_cache_that_is_not_a_size_is_a_usage_error(tiny_model_dir, monkeypatch, capsys, value):
    code, out, err = run_main(monkeypatch, capsys, [str(tiny_model_dir), "--prompt-cache", value, "--once", "你好"])
    assert code == 2 and out == "" and "--prompt-cache must be 0 (off) or a number of megabytes" in err


def test_no_run_yet_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(monkeypatch, capsys, ["--once", "你好"])
    assert code == 2 and "no run recorded yet" in err


def test_latest_pointing_to_a_removed_run_says_so(tmp_path, monkeypatch, capsys):
    from common import artifacts

    monkeypatch.chdir(tmp_path)
    gone = tmp_path / "scratch" / "run"
    gone.mkdir(parents=True)
    artifacts.set_latest(gone, tmp_path / "work_dirs")
    gone.rmdir()  # a run written to a temporary train.output_dir, since removed
    code, _, err = run_main(monkeypatch, capsys, ["--once", "你好"])
    assert code == 2 and err.count("\n") == 1
    assert f"points to {gone}, which is gone" in err


def test_system_template_fills_bot_name(tiny_model_dir):
    assert "whose name is Ada" in system_from_template("moss_sft", "Ada")
    args = chat.parse_args([str(tiny_model_dir), "--torch-dtype", "bf16"])
    assert args.torch_dtype == "bfloat16"


def test_commands_act_on_the_session(loaded):
    s = session(loaded, temperature=0, max_new_tokens=4)
    console = repl.Console(interactive=False, stream=True)
    lines = ["/system 你是一位心理咨询师。", "你好", "RESET", "你好", "/system", "EXIT", "never sent"]
    repl.converse(s, console, enumerate(lines))
    assert s.system is None and len(s.history) == 2  # RESET cleared the first turn; EXIT stopped before the last


# ---------------------------------------------------------------- run directories

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, tokenizer):
    """A run as train.py leaves it: final/ (LoRA adapter + tokenizer + recipe.yaml), and work_dirs/latest."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    work = tmp_path_factory.mktemp("chat_run")
    run = work / "work_dirs" / "demo"
    final = run / artifacts.FINAL_DIR
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    # Paths as training wrote them, relative to its working directory: they need not exist where chat runs.
    recipe = Recipe(model=ModelConfig(path="models/tiny-base"),
                    data=DataConfig(path="data/psych_sample.json", template="internlm2_chat", system=SYSTEM,
                                    max_length=300),
                    evaluation=EvaluationConfig(max_new_tokens=10, temperature=0))
    for d in (run, final):
        save_recipe(recipe, d / artifacts.RECIPE_FILE)
    artifacts.set_latest(run, work / "work_dirs")
    return work, run, model


def test_a_model_without_a_run_is_used_with_the_schema_defaults(tiny_model_dir, tmp_path):
    import json

    source = artifacts.resolve_model(str(tiny_model_dir))
    positions = json.loads((tiny_model_dir / artifacts.MODEL_CONFIG).read_text())["max_position_embeddings"]
    assert source.recipe.data.template == "tokenizer" and source.recipe.data.system is None
    assert source.recipe.data.max_length == positions < artifacts.MAX_LENGTH_CAP
    assert source.recipe.evaluation == EvaluationConfig() and source.recipe.model.trust_remote_code is False
    long_context = tmp_path / "long"  # a model that claims 128k positions is given the cap
    long_context.mkdir()
    config = json.loads((tiny_model_dir / artifacts.MODEL_CONFIG).read_text())
    (long_context / artifacts.MODEL_CONFIG).write_text(json.dumps({**config, "max_position_embeddings": 131072}))
    assert artifacts.resolve_model(str(long_context)).recipe.data.max_length == artifacts.MAX_LENGTH_CAP

    template, system, sampling, max_length = chat.chat_settings(chat.parse_args([str(tiny_model_dir)]), source)
    assert (template.name, system, max_length) == ("tokenizer", None, positions)
    assert (sampling.temperature, sampling.top_k, sampling.max_new_tokens) == (0.1, 40, 256)
    flags = ["--prompt-template", "qwen_chat", "--system", "S", "--max-length", "100", "--temperature", "0"]
    template, system, sampling, max_length = chat.chat_settings(chat.parse_args([str(tiny_model_dir)] + flags), source)
    assert (template.name, system, sampling.temperature, max_length) == ("qwen_chat", "S", 0, 100)


def test_latest_run_without_merge_is_the_adapter_on_its_base(run_dir, loaded, tiny_model_dir, monkeypatch, capsys):
    work, run, _ = run_dir
    monkeypatch.chdir(work)
    source = artifacts.resolve_model(None)
    assert source.adapter == run / "final" and source.model == tiny_model_dir
    assert source.recipe.data.template == "internlm2_chat" and source.recipe.data.system == SYSTEM
    assert source.recipe.data.max_length == 300  # the context chat uses without --max-length
    code, out, err = run_main(monkeypatch, capsys, ["--once", "你好"])
    assert code == 0, err
    expected = session(load_for_generation(source), "internlm2_chat", 300, max_new_tokens=10, system=SYSTEM)
    assert out == expected.reply("你好").text + "\n"
    base = session(loaded, "internlm2_chat", 300, max_new_tokens=10, system=SYSTEM, temperature=0)
    assert out != base.reply("你好").text + "\n"  # the adapter is applied (its LoRA B is non-zero)


def test_latest_run_prefers_merged_and_answers_as_the_adapter_does(run_dir, tokenizer, monkeypatch, capsys):
    work, run, peft_model = run_dir
    monkeypatch.chdir(work)
    code, from_adapter, _ = run_main(monkeypatch, capsys, ["--once", "我最近很焦虑", "--max-new-tokens", "8"])
    merged = run / artifacts.MERGED_DIR
    peft_model.merge_and_unload().save_pretrained(merged)  # what merge.py writes
    tokenizer.save_pretrained(merged)
    (merged / artifacts.RECIPE_FILE).write_bytes((run / artifacts.RECIPE_FILE).read_bytes())
    assert artifacts.resolve_model(None).model == merged
    assert artifacts.resolve_model(str(run)).model == merged  # a run directory as MODEL
    code2, from_merged, _ = run_main(monkeypatch, capsys, ["--once", "我最近很焦虑", "--max-new-tokens", "8"])
    assert code == code2 == 0 and from_merged == from_adapter and from_merged.strip()


def test_half_a_character_cut_by_max_new_tokens_is_not_printed(tokenizer):
    ids = tokenizer.encode("你好🙂", add_special_tokens=False)
    cut = next(n for n in range(len(ids), 0, -1) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    chunks = []
    stream = generation.StopWordStream(tokenizer, [], {tokenizer.eos_token_id}, chunks.append)
    stream.feed(ids[:cut])
    stream.finish()  # generation ended here (max-new-tokens), mid-character
    assert "\ufffd" not in "".join(chunks) and "".join(chunks) == tokenizer.decode(ids[:cut]).rstrip("\ufffd")
