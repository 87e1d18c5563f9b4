"""merge.py --gguf: the GGUF loads back through transformers with the merged model's logits (llama and qwen2, f32 /
f16 / q8_0 / q5_* / q4_*), its tensors in llama.cpp's type mix, its end-of-turn token the template's, its chat
template gives the training token ids, the Modelfile's TEMPLATE renders the training text, verify fails on a damaged
file, and the output appears whole or not at all; on the demo model too."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import merge  # noqa: E402
from common import gguf_export, ollama  # noqa: E402
from common.cli import UserError  # noqa: E402
from common.conversation import Turn, turns_to_messages  # noqa: E402
from common.recipe import DataConfig, EvaluationConfig, ModelConfig, Recipe, save_recipe  # noqa: E402
from common.templates import TEMPLATES, TOKENIZER  # noqa: E402
from tests.small_disk import one_line_exit_2, run_on_a_small_disk  # noqa: E402
from tests.tools import require_tool  # noqa: E402

SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct"
GO_RENDERER = ROOT / "tests" / "fixtures" / "ollama_render" / "main.go"
SYSTEM = "你是一位心理咨询师。"
CONVERSATION = [Turn("我最近总是失眠", "能说说通常几点睡吗？", SYSTEM), Turn("一般凌晨两点", "我们先从固定起床时间开始。"),
                Turn("好的，谢谢", "不客气，有需要随时来聊。")]


def run(*args):
    try:
        return merge.main([str(a) for a in args])
    except SystemExit as e:
        return e.code


def recipe_for(base: Path, template: str) -> Recipe:
    return Recipe(model=ModelConfig(path=str(base)), data=DataConfig(path="d.json", template=template, system=SYSTEM,
                                                                      max_length=256),
                  evaluation=EvaluationConfig(prompts=["我最近很焦虑", "你好"], temperature=0.3, max_new_tokens=20))


def make_model(root: Path, config, tokenizer, template="qwen_chat") -> Path:
    """A full model (a fine-tune, or a model merged earlier) with its tokenizer and the recipe naming its template."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    save_recipe(recipe_for(root, template), root / "recipe.yaml")
    return root


def make_run(root: Path, config, tokenizer, template="qwen_chat"):
    """A finished run: base model, final/ adapter (random B) + tokenizer with the template + recipe.yaml."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = root / "base"
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    run_dir = root / "run"
    final = run_dir / "final"
    model.save_pretrained(final)
    saved = tokenizer.__class__.from_pretrained(base)
    saved.chat_template = (TEMPLATES[template] if template in TEMPLATES else TOKENIZER).chat_template(saved)
    saved.save_pretrained(final)
    recipe = recipe_for(base, template)
    for d in (run_dir, final):
        save_recipe(recipe, d / "recipe.yaml")
    return final


def tiny_config(kind: str, tokenizer, tie: bool = False):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=len(tokenizer) + 8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tie,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common)


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    alone = path.parent / f"alone-{path.stem}"
    alone.mkdir(exist_ok=True)
    (alone / path.name).unlink(missing_ok=True)
    (alone / path.name).symlink_to(path)
    return (AutoModelForCausalLM.from_pretrained(alone, gguf_file=path.name, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(alone, gguf_file=path.name))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_f32_gguf_has_the_merged_logits_and_the_training_template(tmp_path, tokenizer, kind, capsys):
    from transformers import AutoModelForCausalLM

    final = make_run(tmp_path, tiny_config(kind, tokenizer), tokenizer)
    out = final.parent / "merged"
    assert run(final, "--gguf", "f32", "--verify") == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "verify: GGUF f32 vs the merged model: max |logit diff|" in text and text.count("verify: OK") == 2
    gguf_file = out / "model-f32.gguf"
    assert gguf_file.is_file() and (out / "model.safetensors").is_file() and (out / "Modelfile").is_file()
    model, g_tokenizer = load_gguf(gguf_file)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([TEMPLATES["qwen_chat"].encode_ids(tokenizer, CONVERSATION)[0]])
    with torch.no_grad():
        diff = (model(ids).logits - merged(ids).logits).abs().max().item()
        assert diff <= 1e-4 and merged(ids).logits.abs().max() > 0.1
    rendered = g_tokenizer.apply_chat_template(turns_to_messages(CONVERSATION), tokenize=True, return_dict=True)["input_ids"]
    assert list(rendered) == ids[0].tolist()  # the training template travelled inside the GGUF
    # The reader the demo model's conversion uses (common/demo_model.py) gives back every tensor as merged: the
    # export's q/k permutation, which transformers' loader undid above, undone exactly by ours
    weights = merged.state_dict()
    read = gguf_export.read_weights(gguf_file, merged)
    assert read.keys() == weights.keys() and all(torch.equal(read[name], weights[name]) for name in weights)


def test_gguf_reads_back_as_the_exporter_meant(tmp_path, tokenizer):
    """Metadata a GGUF reader relies on: architecture, the tokenizer's pre-split name, special ids, control tokens."""
    from gguf import GGUFReader

    final = make_run(tmp_path, tiny_config("llama", tokenizer), tokenizer)
    assert run(final, "--gguf", "q8_0") == 0
    reader = GGUFReader(final.parent / "merged" / "model-q8_0.gguf")
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    # ChatML ends a turn with <|im_end|>, not EOS (</s>): without the key llama.cpp would guess it from token texts
    assert field("tokenizer.ggml.eot_token_id") == tokenizer.convert_tokens_to_ids("<|im_end|>") != tokenizer.eos_token_id
    assert field("tokenizer.ggml.add_bos_token") is False  # the template writes BOS itself, as training did
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == len(tokenizer) + 8 and tokens[-1] == f"[PAD{len(tokenizer) + 7}]" and types[-1] == 5
    assert types[tokenizer.convert_tokens_to_ids("<|im_start|>")] == 3  # special -> CONTROL
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    assert len(reader.tensors) == 2 * 9 + 3  # 9 per layer, embeddings, final norm, untied output


@pytest.mark.parametrize("template, stop", [("llama3_chat", "<|eot_id|>"), ("llama2_chat", "</s>"), ("gemma", None)])
def test_the_end_of_turn_token_is_the_templates_stop_token(tmp_path, tokenizer, template, stop):
    """tokenizer.ggml.eot_token_id (uint32, as llama.cpp's convert_hf_to_gguf.py writes it) is the token training ended
    answers with: Llama 3's <|eot_id|> (a special token added here), EOS for a template that appends it, and none
    for gemma, whose <end_of_turn> is several tokens in this vocabulary (no one token ends its turns)."""
    from gguf import GGUFReader, GGUFValueType
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "tokenizer")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    tok.add_tokens([AddedToken("<|eot_id|>", special=True)], special_tokens=True)
    model = make_model(tmp_path / "model", tiny_config("llama", tok), tok, template)
    assert run(model, "--gguf", "f16") == 0
    reader = GGUFReader(model / "model-f16.gguf")
    if stop is None:
        assert "tokenizer.ggml.eot_token_id" not in reader.fields
        return
    eot = reader.fields["tokenizer.ggml.eot_token_id"]
    assert eot.types == [GGUFValueType.UINT32] and eot.contents() == tok.convert_tokens_to_ids(stop)
    assert reader.fields["tokenizer.ggml.tokens"].contents()[eot.contents()] == stop


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_f16_and_q8_0_verify(tmp_path, tokenizer, qtype, capsys):
    final = make_run(tmp_path, tiny_config("qwen2", tokenizer), tokenizer)
    assert run(final, "--gguf", qtype, "--verify") == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "the GGUF's chat template gives the training token ids: yes; the Modelfile's TEMPLATE too: yes" in text
    assert ("rounded to f16" in text) if qtype == "f16" else ("same token at" in text)


@pytest.mark.parametrize("qtype, tie", [("q4_0", False), ("q4_1", True), ("q5_0", True), ("q5_1", False)])
def test_4_and_5_bit_types_store_llama_cpps_mix_and_verify(tmp_path, tokenizer, qtype, tie, capsys):
    """The 4/5-bit types the gguf package quantizes: weight matrices in the type, norms and biases f32, the output
    projection (output.weight, or the token embeddings tied to it) Q8_0 as llama.cpp keeps it high; --verify passes.
    And the check can fail: the q4_0 file with its output rows in reverse order (a file that loads, with wrong data)
    fails, on its logits against the same rounding and on the greedy answers."""
    from gguf import GGUFReader

    model = make_model(tmp_path, tiny_config("qwen2", tokenizer, tie), tokenizer)
    assert run(model, "--gguf", qtype, "--verify") == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert f"vs the merged model rounded to {qtype} (what the file stores)" in text and "same token at" in text, text
    path = model / f"model-{qtype}.gguf"
    kinds = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert kinds["blk.0.attn_q.weight"] == kinds["blk.1.ffn_down.weight"] == qtype.upper()
    assert kinds["blk.0.attn_norm.weight"] == kinds["blk.0.attn_q.bias"] == "F32"
    assert kinds["token_embd.weight"] == ("Q8_0" if tie else qtype.upper())
    assert kinds.get("output.weight") == (None if tie else "Q8_0")
    if qtype != "q4_0":
        return
    reader = GGUFReader(path, "r+")
    [output] = [t for t in reader.tensors if t.name == "output.weight"]
    output.data[:] = output.data[::-1].copy()
    reader.data.flush()
    del reader, output
    report = gguf_export.verify(model, path, qtype, merge.artifacts.model_settings(model))
    assert not report["ok"] and report["max_abs_diff"] > report["limit"]
    assert report["greedy_token_agreement"] < report["agreement_limit"]


def test_an_existing_model_exports_in_place_and_unsupported_architectures_are_refused(tmp_path, tokenizer, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    final = make_run(tmp_path, tiny_config("llama", tokenizer), tokenizer)
    assert run(final) == 0
    merged = final.parent / "merged"
    assert run(merged, "--gguf", "f16") == 0 and (merged / "model-f16.gguf").is_file()
    assert run(merged, "--gguf", "f16") == 2 and "--force" in capsys.readouterr().err  # nothing overwritten
    (merged / "Modelfile").write_text("FROM ./mine.gguf\n")  # edited by hand: kept without --force
    assert run(merged, "--gguf", "q8_0") == 2 and "Modelfile: already exists" in capsys.readouterr().err
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer))).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    assert run(gpt2, "--gguf", "q8_0") == 2
    err = capsys.readouterr().err
    assert "supports the llama, mistral, qwen2, qwen3, gemma3_text architectures" in err and "`gpt2`" in err
    assert len(err.strip().splitlines()) == 1
    assert not list(gpt2.glob("*.gguf")) and not list(gpt2.glob(".*tmp*"))


def test_an_export_that_fails_midway_leaves_nothing(tmp_path, tokenizer):
    """The disk fills up while the GGUF is written (tests/small_disk.py: at a third of the GGUF's size): one line
    and exit 2, and no GGUF or Modelfile, whole or partial, beside the model."""
    final = make_run(tmp_path, tiny_config("llama", tokenizer), tokenizer)
    assert run(final) == 0
    merged = final.parent / "merged"
    assert run(merged, "--gguf", "f32") == 0  # the size of the whole file, then gone again
    whole = gguf_export.gguf_path(merged, "f32")
    limit = whole.stat().st_size // 3
    for f in merged.iterdir():
        if "gguf" in f.name or f.name == "Modelfile":
            f.unlink()

    proc = run_on_a_small_disk("merge.py", merged, "--gguf", "f32", limit=limit)
    assert one_line_exit_2(proc) and "not written" in proc.stderr, proc.stderr[-3000:]
    assert sorted(f.name for f in merged.iterdir() if "gguf" in f.name or f.name == "Modelfile") == []


# ---------------------------------------------------------------- the Modelfile's TEMPLATE

def test_go_renderer_on_a_known_template():
    template = ('{{ if .System }}S:{{ .System }}|{{ else }}none|{{ end }}{{ $first := true }}{{ range .Messages }}'
                '{{ if eq .Role "user" }}{{ if not $first }}+{{ end }}{{ $first = false }}U:{{ .Content }}>'
                '{{ else if eq .Role "assistant" }}A:{{ .Content }};{{ end }}{{ end }}{{ "{{" }}')
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert ollama.render_go(template, "sys", messages) == "S:sys|U:a>A:b;+U:c>{{"
    assert ollama.render_go(template, None, messages[:1]) == "none|U:a>{{"


@pytest.mark.parametrize("name", ["qwen_chat", "llama2_chat", "internlm2_chat", "vicuna", "llama3_chat", "tokenizer"])
def test_modelfile_template_renders_the_training_text(tmp_path, tokenizer, name):
    """For a 3-turn conversation, with and without a system prompt: Ollama's rendering (our renderer of the subset
    we write) equals the text training encodes, token for token."""
    template = TEMPLATES.get(name) or TOKENIZER
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path) if tokenizer.name_or_path else tokenizer
    path = ollama.write_modelfile(tmp_path, "model-q8_0.gguf", template, tokenizer, SYSTEM, EvaluationConfig(), 512)
    text = path.read_text(encoding="utf-8")
    go = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert f'SYSTEM """{SYSTEM}"""' in text and "FROM ./model-q8_0.gguf" in text
    for stop in template.stop_words(tokenizer):
        assert f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" in text
    assert "PARAMETER temperature 0.1" in text and "PARAMETER num_ctx 512" in text
    for system in (SYSTEM, None):
        turns = [Turn(t.input, t.output, system if i == 0 else None) for i, t in enumerate(CONVERSATION)]
        prompt = turns[:-1] + [Turn(turns[-1].input, None)]
        ids = template.encode_ids(tokenizer, prompt)[0]
        rendered = ollama.render_go(go, system, turns_to_messages(prompt)[1 if system else 0:])
        assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == ids


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """render(modelfile, requests) -> prompts, by tests/fixtures/ollama_render (Go's text/template, as Ollama renders
    a chat request), built once per session."""
    go = shutil.which("go")
    require_tool(None if go else "no Go toolchain: install golang-go (.ci/run does) to render Modelfiles with Go's "
                                 "text/template")
    out = tmp_path_factory.mktemp("ollama_render")
    # A cache of its own: the build needs no HOME and leaves nothing in the user's Go cache.
    env = dict(os.environ, GOCACHE=str(out / "cache"), GOPATH=str(out / "gopath"), GOFLAGS="", GO111MODULE="")
    binary = out / "ollama_render"
    build = subprocess.run([go, "build", "-o", str(binary), GO_RENDERER.name], cwd=GO_RENDERER.parent, env=env,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr

    def render(modelfile: Path, requests: list[list[dict]]) -> list[str]:
        proc = subprocess.run([str(binary), str(modelfile)], input=json.dumps(requests), capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    return render


# Templates whose turns an Ollama TEMPLATE cannot express: chatglm2 counts rounds; minicpm has no place for a system
# prompt, which the turn shape is read through. merge.py writes their GGUF without a Modelfile.
NO_MODELFILE = {"chatglm2", "minicpm"}


def test_go_renders_every_modelfile_template_as_training_encodes(tmp_path, tokenizer, go_render):
    """Every template's Modelfile, rendered by Go for a 3-turn chat request as Ollama renders one: the Modelfile's
    SYSTEM, a request's own system prompt, and no system prompt all give the training token ids, and our Python
    renderer (which merge.py --verify uses) gives Go's text exactly."""
    other = "你是一位老师。"
    prompt = [Turn(t.input, t.output) for t in CONVERSATION[:-1]] + [Turn(CONVERSATION[-1].input, None)]
    messages = turns_to_messages(prompt)
    refused = set()
    for name, template in [*TEMPLATES.items(), ("tokenizer", TOKENIZER)]:
        cases = []  # (Modelfile's SYSTEM, the request's messages, the system prompt training would have seen)
        if template.has_system:
            cases += [(SYSTEM, messages, SYSTEM), (SYSTEM, [{"role": "system", "content": other}] + messages, other)]
        cases.append((None, messages, None))
        for i, (modelfile_system, request, system) in enumerate(cases):
            out = tmp_path / f"{name}-{i}"
            out.mkdir()
            try:
                path = ollama.write_modelfile(out, "model-f16.gguf", template, tokenizer, modelfile_system,
                                              EvaluationConfig(), 512)
            except UserError:
                refused.add(name)
                break
            [rendered] = go_render(path, [request])
            turns = [Turn(t.input, t.output, system if j == 0 else None) for j, t in enumerate(prompt)]
            assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == \
                template.encode_ids(tokenizer, turns)[0], (name, system, rendered)
            go = path.read_text(encoding="utf-8").split('TEMPLATE """', 1)[1].split('"""', 1)[0]
            assert ollama.render_go(go, system, messages) == rendered, (name, system)
    assert refused == NO_MODELFILE


def test_the_go_renderer_is_ollamas_text_template(tmp_path, go_render):
    """Where Go's semantics differ from a naive reading, the harness shows Go's: `:=` inside range declares a new
    variable for that iteration only; the Modelfile's SYSTEM is the first message and appears in .Messages."""
    path = tmp_path / "Modelfile"
    path.write_text('FROM ./m.gguf\nTEMPLATE """{{ $n := 0 }}{{ range .Messages }}{{ $n := 1 }}[{{ .Role }}:{{ .Content }}]'
                    '{{ end }}{{ $n }}|{{ .System }}"""\nSYSTEM """be kind"""\n', encoding="utf-8")
    assert go_render(path, [[{"role": "user", "content": "hi"}], [{"role": "system", "content": "s"}]]) == \
        ["[system:be kind][user:hi]0|be kind", "[system:s]0|s"]


def test_a_template_with_a_round_counter_gets_no_modelfile(tmp_path, tokenizer, capsys):
    final = make_run(tmp_path, tiny_config("llama", tokenizer), tokenizer, template="chatglm2")
    assert run(final, "--gguf", "f16") == 0
    assert "no Modelfile" in capsys.readouterr().out and not (final.parent / "merged" / "Modelfile").exists()
    assert (final.parent / "merged" / "model-f16.gguf").is_file()


@pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(), reason="run `make demo-model` first")
def test_the_demo_model_exports_and_loads_back(tmp_path, capsys):
    """SmolLM2-135M-Instruct (llama, tied embeddings, its real 49k-token tokenizer and ChatML template) as a full
    model: the f16 export verifies. One type: reading a real GGUF back through transformers costs ~25 s on a 2-core
    AVX2 CPU, and the quantized types' arithmetic (q8_0's greedy agreement included) is checked on the tiny models."""
    model = tmp_path / "smollm2"
    model.mkdir()
    for f in SMOLLM2.iterdir():
        (model / f.name).symlink_to(f)  # read-only use: the export writes only new files beside them
    assert run(model, "--gguf", "f16", "--verify") == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "verify: OK" in text and "the Modelfile's TEMPLATE too: yes" in text, text
    assert os.path.getsize(model / "model-f16.gguf") < 0.55 * sum(f.stat().st_size for f in SMOLLM2.glob("*.safetensors"))
