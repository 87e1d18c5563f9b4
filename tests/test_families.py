"""Current model families' chat templates (common/chat_templates/): each named template renders token for token what
the family's published Jinja renders (tests/fixtures/chat_templates/), and a template that rewrites history (Qwen3's,
Mistral's) trains every turn on exactly the tokens inference sees."""
from pathlib import Path

import pytest

from common.conversation import Turn, turns_to_messages
from common.templates import FAMILIES, IGNORE, THINKING, conversation_for, get_template

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "chat_templates"
PUBLISHED = {  # our name -> (published Jinja, the render variables it is compared under)
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", {}),
    "qwen3_nothink": ("Qwen-Qwen3-0.6B.jinja", {"enable_thinking": False}),
    "llama3": ("meta-llama-Llama-3.3-70B-Instruct.jinja", {}),
    "gemma3": ("google-gemma-3-it.jinja", {}),
    "mistral_nemo": ("mistralai-Mistral-Nemo-Instruct-2407.jinja", {}),
}
END_OF_TURN = {"qwen3": "<|im_end|>", "qwen3_nothink": "<|im_end|>", "llama3": "<|eot_id|>", "gemma3": "<end_of_turn>",
               "mistral_nemo": "</s>"}
CONVERSATION = [
    Turn("我最近总是失眠", "我能理解你的困扰。能说说通常几点睡吗？", system="你是一位心理咨询师"),
    Turn("一般凌晨两点", "这确实很晚了。我们可以先从固定起床时间开始。"),
    Turn("好的，谢谢", "不客气，有需要随时来聊。"),
]
NO_SYSTEM = [Turn(t.input, t.output) for t in CONVERSATION]


def published(name: str) -> str:
    return (FIXTURES / PUBLISHED[name][0]).read_text(encoding="utf-8")


def chat_ids(tok, messages, generation: bool, jinja: str, **kwargs) -> list[int]:
    """apply_chat_template's token ids (newer transformers return a BatchEncoding)."""
    out = tok.apply_chat_template(messages, add_generation_prompt=generation, chat_template=jinja, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def family_tokenizer():
    """The test tokenizer with the families' markers as special tokens, as their own tokenizers have them."""
    from conftest import build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>", "[INST]",
        "[/INST]", "<think>", "</think>"]})
    return tok


def test_every_family_has_its_published_template():
    from common.templates import TEMPLATES

    assert set(FAMILIES) == set(PUBLISHED) and not set(FAMILIES) & set(TEMPLATES)  # XTuner's names keep their meaning
    listed = (FIXTURES / "README.md").read_text(encoding="utf-8")
    assert all(f"`{jinja}`" in listed for jinja, _ in PUBLISHED.values())


@pytest.mark.parametrize("turns", [CONVERSATION, NO_SYSTEM], ids=["system", "no_system"])
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_named_template_is_token_exact_against_the_published_one(family_tokenizer, name, turns):
    """Every prefix of a multi-turn conversation, with and without the generation prompt, tokenizes to the same ids
    through our Jinja (as saved with the model) and through the family's own."""
    tok, ours, theirs = family_tokenizer, get_template(name).chat_template(family_tokenizer), published(name)
    kwargs = PUBLISHED[name][1]
    messages = turns_to_messages(turns)
    for end in range(1, len(messages) + 1):
        upto = messages[:end]
        generation = upto[-1]["role"] == "user"
        mine = chat_ids(tok, upto, generation, ours)
        reference = chat_ids(tok, upto, generation, theirs, **kwargs)
        assert mine == reference, (name, end, tok.decode(mine), tok.decode(reference))


def _samples(tok, template, turns):
    return [(v, [i for s in v.segments for i in s[0]], [lab for s in v.segments for lab in s[1]])
            for v in template.views(tok, turns)]


@pytest.mark.parametrize("turns", [CONVERSATION, NO_SYSTEM], ids=["system", "no_system"])
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_every_turn_trains_on_what_inference_sees(family_tokenizer, name, turns):
    """Per trained turn: the untrained tokens are the published template's generation prompt for the history up to
    it, and the trained tokens are the answer and its end-of-turn (after Qwen3's empty think block when thinking is
    on: that is what the model must learn to write). The published template answers turn k from exactly these ids."""
    tok, template = family_tokenizer, get_template(name)
    theirs, kwargs = published(name), PUBLISHED[name][1]
    samples = _samples(tok, template, turns)
    if samples[0][0].rewritten:
        assert len(samples) == len(turns)
        per_turn = [(k, ids, labels) for k, (_, ids, labels) in enumerate(samples)]
    else:  # one sample: cut it at each answer's first label
        (_, ids, labels), = samples
        per_turn, start = [], 0
        for k in range(len(turns)):
            first = next(n for n in range(start, len(labels)) if labels[n] != IGNORE)
            end = next((n for n in range(first, len(labels)) if labels[n] == IGNORE), len(labels))
            per_turn.append((k, ids[:end], [IGNORE] * first + labels[first:end]))
            start = end
    think = "" if "enable_thinking" in kwargs or not name.startswith("qwen3") else "<think>\n\n</think>\n\n"
    for k, ids, labels in per_turn:
        history = turns_to_messages(turns[:k] + [Turn(turns[k].input, None, turns[k].system)])
        prompt = chat_ids(tok, history, True, theirs, **kwargs)
        first = next(n for n, lab in enumerate(labels) if lab != IGNORE)
        assert ids[:first] == prompt, (name, k, tok.decode(ids[:first]), tok.decode(prompt))
        answer = tok.encode(think + turns[k].output + END_OF_TURN[name], add_special_tokens=False)
        assert ids[first:] == labels[first:] == answer, (name, k, tok.decode(ids[first:]))


def test_qwen3_published_template_as_the_tokenizer_template(family_tokenizer):
    """`template: tokenizer` with Qwen3's own Jinja (the issue's case): found to rewrite history, one sample per turn,
    each the same as the named template gives."""
    tok = family_tokenizer
    old = tok.chat_template
    tok.chat_template = published("qwen3")
    try:
        for thinking in ("keep", "nothink"):
            own = _samples(tok, get_template("tokenizer", thinking), CONVERSATION)
            named = _samples(tok, get_template("qwen3", thinking), CONVERSATION)
            assert [v.rewritten for v, _, _ in own] == [True] * 3
            assert [(i, lab) for _, i, lab in own] == [(i, lab) for _, i, lab in named]
    finally:
        tok.chat_template = old


def test_reasoning_kept_dropped_or_nothink(family_tokenizer):
    """data.thinking: keep trains the reasoning inside the think block; drop trains an empty one; nothink trains the
    answer alone after the no-thinking prompt. OpenAI's reasoning_content and an inline think block read the same."""
    from common.conversation import messages_to_turns

    tok = family_tokenizer
    messages = [{"role": "user", "content": "睡不着怎么办"},
                {"role": "assistant", "content": "先固定起床时间。", "reasoning_content": "用户失眠，先给行为建议。"}]
    turns = messages_to_turns(messages)
    assert turns[0].output == "<think>\n用户失眠，先给行为建议。\n</think>\n\n先固定起床时间。"
    trained = {}
    for thinking in THINKING:
        (_, ids, labels), = _samples(tok, get_template("qwen3", thinking), conversation_for(turns, thinking))
        trained[thinking] = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    assert trained == {"keep": "<think>\n用户失眠，先给行为建议。\n</think>\n\n先固定起床时间。<|im_end|>",
                       "drop": "<think>\n\n</think>\n\n先固定起床时间。<|im_end|>",
                       "nothink": "先固定起床时间。<|im_end|>"}


def test_the_prompt_inference_sees(family_tokenizer):
    """`Template.prompt_ids` (chat, the server, GRPO's prompts): the published generation prompt, for every family."""
    tok = family_tokenizer
    for name in PUBLISHED:
        expected = chat_ids(tok, turns_to_messages(CONVERSATION[:2]) + [{"role": "user", "content": "好的"}], True,
                            published(name), **PUBLISHED[name][1])
        assert get_template(name).prompt_ids(tok, CONVERSATION[:2] + [Turn("好的", "ignored")]) == expected, name


def test_preference_pair_as_inference_sees_it(family_tokenizer):
    """A pair on a template that rewrites history: the prompt is the published generation prompt for the history,
    each side its answer and end-of-turn."""
    from common.pairs import Pair, encode_pair

    tok = family_tokenizer
    pair = Pair(CONVERSATION[:2] + [Turn("好的，谢谢", None)], "不客气。", "随便。")
    row = encode_pair(tok, get_template("qwen3_nothink"), pair)
    history = turns_to_messages(CONVERSATION[:2]) + [{"role": "user", "content": "好的，谢谢"}]
    prompt = chat_ids(tok, history, True, published("qwen3"), enable_thinking=False)
    assert row["prompt_ids"] == prompt
    assert row["chosen_ids"] == tok.encode("不客气。<|im_end|>", add_special_tokens=False)
    assert row["rejected_ids"] == tok.encode("随便。<|im_end|>", add_special_tokens=False)


def test_pairs_and_rated_answers_lose_their_reasoning_when_training_drops_it(tmp_path, tiny_model_dir):
    """data.thinking drop / nothink: a pair's answers (and a rated answer) lose their think blocks as SFT's
    conversations do; keep trains them as written."""
    import json

    from common.methods import table
    from common.methods.table import load_recipe

    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"prompt": "睡不着怎么办", "chosen": "<think>\n先问作息。\n</think>\n\n先固定起床时间。",
                                  "rejected": "<think>\n随便答。\n</think>\n\n多喝水。"}] * 2, ensure_ascii=False))
    rated = tmp_path / "rated.json"
    rated.write_text(json.dumps([{"prompt": "睡不着怎么办", "completion": "<think>\n先问作息。\n</think>\n\n先固定起床时间。",
                                  "label": True}, {"prompt": "睡不着", "completion": "多喝水。", "label": False}],
                                ensure_ascii=False))
    tok = __import__("transformers").AutoTokenizer.from_pretrained(tiny_model_dir)

    def answers(method, path, thinking):
        recipe_file = tmp_path / f"{method}-{thinking}.yaml"
        recipe_file.write_text(f"model: {{path: {tiny_model_dir}}}\ntrain: {{method: {method}, batch_size: 2}}\n"
                               f"data: {{path: {path}, template: qwen_chat, pack: false, thinking: {thinking}}}\n", encoding="utf-8")
        recipe = load_recipe(recipe_file, [])
        rows = table.METHODS[method].build_datasets(recipe, tok)[0]
        row = next(r for r in rows if r.get("label", True))  # KTO shuffles its rows: the good answer
        return tok.decode(row["chosen_ids" if method == "dpo" else "completion_ids"])

    for method, path in (("dpo", pairs), ("kto", rated)):
        kept, dropped = answers(method, path, "keep"), answers(method, path, "drop")
        assert "<think>" in kept and "先问作息" in kept, (method, kept)
        assert "<think>" not in dropped and "先问作息" not in dropped and "先固定起床时间" in dropped, (method, dropped)


def test_dry_run_with_qwen3s_own_template_states_the_cost_and_packs(tmp_path, tiny_model_dir, data_file):
    """The issue's case: SmolLM2-like tokenizer + Qwen3's published template, `template: tokenizer`, multi-turn
    counselling data: --dry-run works, says what re-encoding costs, and packs the per-turn samples."""
    import shutil

    from test_dry_run import run

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = published("qwen3")
    tok.save_pretrained(model)
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{path: {model}}}\ndata: {{path: {data_file}, "
                    f"template: tokenizer, thinking: nothink, max_length: 1024}}\n", encoding="utf-8")
    out = run(path, "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "turns as inference sees them" in out.stdout and "re-encoded history +" in out.stdout
    assert "packed rows" in out.stdout
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\n[[" in out.stdout


# ---------------------------------------------------------------- the architectures, end to end on tiny random models

ARCHITECTURES = ["qwen3", "gemma3_text", "mistral", "phi3"]


def family_config(kind: str, tokenizer, window: int | None = 16):
    """A tiny random model of the family. Qwen3 and Gemma 3 keep their own head size (128, 256): transformers' GGUF
    reader does not carry it for Qwen3, nor Gemma 3's query_pre_attn_scalar, so a file of another size would not read
    back as the model. `window`: the sliding window of the families that have one, shorter than a sample, so that
    the fast paths' band is what is tested."""
    from transformers import Gemma3TextConfig, MistralConfig, Phi3Config, Qwen3Config

    common = dict(vocab_size=len(tokenizer) + 8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return {
        "qwen3": lambda: Qwen3Config(**common, head_dim=128),
        "gemma3_text": lambda: Gemma3TextConfig(**{**common, "tie_word_embeddings": True}, head_dim=256,
                                                query_pre_attn_scalar=256, sliding_window=window or 4096),
        "mistral": lambda: MistralConfig(**common, sliding_window=window),
        "phi3": lambda: Phi3Config(**common, sliding_window=window),
    }[kind]()


def family_model(root: Path, kind: str, tokenizer, window: int | None = 16) -> Path:
    from transformers import AutoModelForCausalLM

    import torch

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(family_config(kind, tokenizer, window)).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_fast_paths_equal_the_plain_loss(tmp_path, tokenizer, kind):
    """train.fast_paths on vs off, one packed batch of samples longer than the sliding window (Gemma 3's local layer,
    Mistral's and Phi-3's window): the same loss and gradients, the packed attention in use."""
    import torch

    from common import acceleration
    from test_speed import _loss_and_grads, _trainer

    model_dir = family_model(tmp_path / kind, kind, tokenizer)
    fast = _trainer(tmp_path, model_dir, tokenizer, pack=True, lora=True, fast=True)
    plain = _trainer(tmp_path, model_dir, tokenizer, pack=True, lora=True, fast=False)
    assert fast.fast_paths.packed_attention and fast.model.config._attn_implementation == acceleration.PACKED_ATTENTION
    batch = fast.data_collator([fast.train_dataset[i] for i in range(min(2, len(fast.train_dataset)))])
    ours, our_grads = _loss_and_grads(fast, batch)
    full, full_grads = _loss_and_grads(plain, batch)
    assert abs(ours - full) < 1e-5, (kind, ours, full)
    for name in full_grads:
        torch.testing.assert_close(our_grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


GGUF_FAMILIES = ["qwen3", "gemma3_text", "mistral"]  # Phi-3 is refused: common/gguf_export.py architectures()
GGUF_WINDOW = {"qwen3": None, "gemma3_text": 16, "mistral": None}  # llama.cpp's llama graph (Mistral's) has none


@pytest.mark.parametrize("kind", GGUF_FAMILIES)
def test_merge_verify_and_gguf_f16(tmp_path, tokenizer, kind, capsys):
    """merge.py --gguf f16 --verify on a finished run of the family: the merge is proved against PEFT, the GGUF read
    back through transformers has the merged logits and renders the training ids (chat template and Modelfile)."""
    from test_gguf import make_run, run

    final = make_run(tmp_path, family_config(kind, tokenizer, GGUF_WINDOW[kind]), tokenizer)
    assert run(final, "--gguf", "f16", "--verify") == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.count("verify: OK") == 2 and "the GGUF's chat template gives the training token ids: yes" in out


def test_phi3_merges_and_its_gguf_is_refused_in_one_line(tmp_path, tokenizer, capsys):
    """Phi-3 merges (--verify: against PEFT); its GGUF is not written (why: common/gguf_export.py architectures()):
    merge.py --gguf stops with exit 2 and one line."""
    from test_gguf import make_run, run

    final = make_run(tmp_path, family_config("phi3", tokenizer, None), tokenizer)
    assert run(final, "--verify") == 0 and "verify: OK" in capsys.readouterr().out
    assert run(final, "--gguf", "f16", "--force") == 2
    err = capsys.readouterr().err
    assert "GGUF export supports" in err and "`phi3`" in err and len(err.strip().splitlines()) == 1


def gguf_for(root: Path, kind: str, tokenizer) -> tuple[Path, str]:
    """The f16 GGUF of the family's seeded tiny model (qwen_chat template) and its sha256: what llama.cpp ran."""
    import hashlib

    from common import gguf_export
    from common.templates import get_template

    model_dir = family_model(root, kind, tokenizer, GGUF_WINDOW[kind])
    config, tok = gguf_export.read_model(model_dir)
    template = get_template("qwen_chat")
    path = gguf_export.export(model_dir, "f16", template.chat_template(tok), gguf_export.end_of_turn_id(template, tok),
                              kind, config, tok)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def llama_cpp_prompt(tokenizer) -> str:
    """A chat prompt longer than Gemma 3's window here (16), so that llama.cpp's local layers must honour it."""
    from common.templates import get_template

    ids = get_template("qwen_chat").prompt_ids(tokenizer, CONVERSATION)
    return tokenizer.decode(ids)


def _llama_cpp_live(path: Path, text: str) -> dict | None:
    """llama.cpp's run of the file, where llama-cpp-python is importable here or LLAMA_CPP_PYTHON names a Python
    that has it; None elsewhere (the fixture, written by the same runner, is then the comparison)."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    runner = Path(__file__).resolve().parent / "fixtures" / "llama_cpp" / "run_llama_cpp.py"
    if importlib.util.find_spec("llama_cpp") is not None:
        python = sys.executable
    elif os.environ.get("LLAMA_CPP_PYTHON"):
        python = os.environ["LLAMA_CPP_PYTHON"]
    else:
        return None
    out = subprocess.run([python, str(runner), str(path), text, "8"], check=True, capture_output=True, text=True,
                         timeout=120)
    return json.loads(out.stdout)


@pytest.mark.parametrize("kind", GGUF_FAMILIES)
def test_llama_cpp_runs_the_gguf_as_transformers_runs_the_model(tmp_path, tokenizer, kind):
    """The f16 GGUF in a real llama.cpp: the same prompt ids, logits within 1e-2 of the model's (its weights rounded
    to f16 as the file stores them) and the same 8 greedy tokens. Against tests/fixtures/llama_cpp/expected.json
    (written by llama-cpp-python through make_fixture.py, for this very file: its sha256 is checked), and live
    where llama-cpp-python is installed."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from common import gguf_export

    fixture = json.loads((Path(__file__).resolve().parent / "fixtures" / "llama_cpp" / "expected.json")
                         .read_text(encoding="utf-8"))[kind]
    path, digest = gguf_for(tmp_path, kind, tokenizer)
    assert digest == fixture["gguf_sha256"], "not the file llama.cpp ran: rerun its make_fixture.py"
    text = llama_cpp_prompt(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        gguf_export._round_as_stored(model, tmp_path, model.config, "f16")
        logits = model(torch.tensor([ids])).logits[0, -1]
        greedy, last = [], logits
        for _ in range(8):  # greedy past EOS too, as the runner does
            greedy.append(int(last.argmax()))
            last = model(torch.tensor([ids + greedy])).logits[0, -1]
    for ran in filter(None, [fixture, _llama_cpp_live(path, text)]):
        assert ran["prompt_ids"] == ids
        assert (torch.tensor(ran["logits"][:logits.shape[0]]) - logits).abs().max() < 1e-2, kind
        assert ran["greedy"] == greedy, kind


@pytest.mark.parametrize("kind,window,compiled", [("qwen3", None, True), ("mistral", None, True), ("phi3", None, True),
                                                  ("gemma3_text", 16, False), ("mistral", 16, False)])
def test_compiled_decode_applies_or_decoding_is_eager(tmp_path, tokenizer, kind, window, compiled):
    """The compiled decode step takes plain full-attention models (its build is tests/test_decode_step.py's, the same
    code for every family); a model with a sliding window (Gemma 3's local layers, a windowed Mistral) gets no
    package (`structure` is None: the cache layers are not plain) and answers eagerly, as transformers does."""
    import torch
    from transformers import AutoModelForCausalLM

    from common import decode_step
    from common.decoding import Decoder, Row

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(kind, tokenizer, window)).eval()
    assert (decode_step.structure(model) is not None) == compiled
    fast = decode_step.FastStep.for_model(model, build=False, root=tmp_path)
    assert (fast is not None) == compiled and not list(tmp_path.iterdir())  # nothing built here
    prompt = list(range(40, 80))  # longer than the window
    row = Row(prompt, 12, frozenset())
    Decoder(model, fast=fast).run(row)
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
    assert row.answer == expected[:len(row.answer)] and row.answer


def test_no_think_block_reaches_the_user_when_thinking_is_off(tokenizer):
    """A model that writes a think block all the same (trained with reasoning, served with thinking off): the reply
    streamed and whole holds only the answer; with thinking on it is shown as written."""
    from common.generation import StopWordStream

    ids = tokenizer.encode("<think>\n我在想\n</think>\n\n你好，谢谢", add_special_tokens=False)
    for hide, expected in ((True, "你好，谢谢"), (False, "<think>\n我在想\n</think>\n\n你好，谢谢")):
        shown = []
        stream = StopWordStream(tokenizer, ["<|im_end|>"], set(), shown.append, hide_reasoning=hide)
        for n in range(1, len(ids) + 1):
            stream.feed(ids[:n])
        stream.finish()
        assert "".join(shown) == stream.answer == expected
    assert get_template("qwen3_nothink").thinking_off() and get_template("qwen3", "nothink").thinking_off()
    assert not get_template("qwen3").thinking_off() and not get_template("qwen_chat", "nothink").thinking_off()


@pytest.mark.parametrize("kind,template", [("qwen3", "qwen3_nothink"), ("gemma3_text", "gemma3"),
                                           ("mistral", "mistral_nemo"), ("phi3", "llama3")])
def test_the_server_answers(tmp_path, family_tokenizer, kind, template):
    """The OpenAI-compatible API (in process) on each family, in a family template: the reply is the generation core's
    answer to the same messages, in the template the model was given (Phi-3 has no template of its own here)."""
    import torch
    from starlette.testclient import TestClient
    from transformers import AutoModelForCausalLM

    from common.generation import Generator, Sampling
    from common.server.app import create_app
    from common.server.worker import Worker

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(kind, family_tokenizer)).eval()
    model.resize_token_embeddings(len(family_tokenizer) + 8)
    generator = Generator(model, family_tokenizer, get_template(template), max_length=512)
    messages = [{"role": "system", "content": "你是一位心理咨询师"}, {"role": "user", "content": "我最近总是失眠"}]
    expected = generator.generate(messages, Sampling(max_new_tokens=8)).text
    app = create_app(Worker(generator, queue_size=2, max_batch=1), "family", Sampling(max_new_tokens=8))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        reply = client.post("/v1/chat/completions", json={"model": "family", "messages": messages})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == expected


def test_the_api_switches_thinking_per_request(tmp_path, family_tokenizer):
    """`chat_template_kwargs: {"enable_thinking": false}` on a Qwen3 model served with thinking on: the prompt is the
    no-thinking one (Qwen3's published template with enable_thinking=False) and the reply is what the generation core
    gives for it; a switch the server does not know is a 400 that names it."""
    import torch
    from starlette.testclient import TestClient
    from transformers import AutoModelForCausalLM

    from common.generation import Generator, Sampling
    from common.server.app import create_app
    from common.server.worker import Worker

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config("qwen3", family_tokenizer)).eval()
    generator = Generator(model, family_tokenizer, get_template("qwen3"), max_length=512)
    messages = [{"role": "user", "content": "我最近总是失眠"}]
    assert generator.prompt_ids(messages, get_template("qwen3", "nothink")) == chat_ids(
        family_tokenizer, messages, True, published("qwen3"), enable_thinking=False)
    off = generator.generate(messages, Sampling(max_new_tokens=8))  # the served default: thinking on
    app = create_app(Worker(generator, queue_size=2, max_batch=1), "qwen3", Sampling(max_new_tokens=8))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        def ask(**extra):
            return client.post("/v1/chat/completions", json={"messages": messages, **extra})

        reply = ask(chat_template_kwargs={"enable_thinking": False})
        expected = generator.start(messages, Sampling(max_new_tokens=8), switches={"enable_thinking": False})
        generator.decoder().run(expected.row)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == expected.completion().text
        assert reply.json()["usage"]["prompt_tokens"] == len(expected.row.prompt)  # the no-thinking prompt
        on = ask().json()
        assert on["choices"][0]["message"]["content"] == off.text
        assert on["usage"]["prompt_tokens"] < reply.json()["usage"]["prompt_tokens"]  # no empty think block
        bad = ask(chat_template_kwargs={"tools_mode": 1})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template_kwargs"
