"""merge.py on tiny random llamas: merged logits equal PEFT's, shards and index are right, tied weights stay loadable."""
import json
import os
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import merge
from common import artifacts

warnings.filterwarnings("ignore", category=UserWarning)
CHAT_TEMPLATE = "{% for m in messages %}<{{ m.role }}> {{ m.content }} </s> {% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
WORDS = "hello who are you write a haiku about the sea what is 17 times 23 explain briefly ! ? . <user> <assistant>".split()
PROMPTS = [[1, 5, 9, 33, 4, 17, 2], [7, 7, 120, 250, 3]]


def tiny_tokenizer():
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   chat_template=CHAT_TEMPLATE)


def save_base(path, tie=False, hidden=64, shard_size=None, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path, **({"max_shard_size": shard_size} if shard_size else {}))
    tiny_tokenizer().save_pretrained(path)
    return path


def save_adapter(base, path, zero_b=False, **lora):
    """A LoRA whose A, B (and DoRA magnitude) are all random, so the merge has something to prove."""
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **lora}
    peft_model = get_peft_model(model, LoraConfig(**lora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand_like(p))
            elif "lora_" in name:
                p.normal_(0, 0.1)
                if zero_b and ("lora_B" in name or "lora_embedding_B" in name):
                    p.zero_()
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(path)
    return path


@torch.no_grad()
def logits(model):
    return [model(input_ids=torch.tensor([ids])).logits.float() for ids in PROMPTS]


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def peft_logits(base, adapter, merge_and_unload=False):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    return logits(model.merge_and_unload() if merge_and_unload else model)


def merged_logits(out):
    return logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval())


def run(*args):
    """merge.main's exit status (main_guard turns a UserError into SystemExit(2))."""
    try:
        return merge.main([str(a) for a in args])
    except SystemExit as e:
        return e.code


def tensor_names(out):
    names = []
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            names += list(h.keys())
    return names


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("base") / "base")


# ------------------------------------------------------------------------------------------------ equals PEFT's merge
@pytest.mark.parametrize("lora", [
    {},  # plain LoRA on every linear layer
    {"use_rslora": True, "modules_to_save": ["lm_head", "norm"]},  # alpha/sqrt(r); whole trained copies
    {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    {"use_dora": True},
    {"use_dora": True, "target_modules": ["embed_tokens", "o_proj"]},  # DoRA on an embedding: norm over the vocab axis
    {"lora_bias": True, "target_modules": ["q_proj"]},
], ids=["lora", "rslora+modules_to_save", "patterns", "dora", "dora-embedding", "lora_bias"])
def test_merged_logits_equal_peft_merge_and_unload(tmp_path, base, lora):
    if lora.get("lora_bias"):  # a LoRA bias needs a base bias
        base = tmp_path / "biased"
        model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, attention_bias=True))
        model.save_pretrained(base)
        tiny_tokenizer().save_pretrained(base)
    adapter = save_adapter(base, tmp_path / "adapter", **lora)
    assert run(base, adapter, tmp_path / "out") == 0
    merged = merged_logits(tmp_path / "out")
    assert max_diff(merged, peft_logits(base, adapter, merge_and_unload=True)) <= 1e-5
    assert max_diff(merged, peft_logits(base, adapter)) <= 1e-5
    assert max_diff(merged, logits(AutoModelForCausalLM.from_pretrained(base))) > 1e-3  # the adapter did something


def test_output_is_a_standalone_model_with_tokenizer_and_configs(tmp_path, base):
    adapter = save_adapter(base, tmp_path / "adapter")
    assert run(base, adapter, tmp_path / "out", "--dtype", "bf16") == 0
    out = tmp_path / "out"
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not [f for f in files if f.startswith(".")] and not list(tmp_path.glob(".out.tmp-*"))  # temp dir renamed
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    # one spelling of dtypes everywhere: the recipe's `float32` works here too
    assert run(base, adapter, tmp_path / "out32", "--dtype", "float32") == 0
    assert json.loads((tmp_path / "out32" / "config.json").read_text())["dtype"] == "float32"


# ----------------------------------------------------------------------------------------------------- shards, index
@pytest.mark.parametrize("layout", ["sharded", "bin"])
def test_shard_limit_respected_and_index_complete(tmp_path, layout):
    if layout == "sharded":  # a base already in several shards
        base = save_base(tmp_path / "base", shard_size="60KB")
        assert len(list(base.glob("*.safetensors"))) > 3
    else:  # a pytorch_model.bin base, read through torch with weights_only=True
        base = save_base(tmp_path / "base")
        model = AutoModelForCausalLM.from_pretrained(base)
        torch.save(model.state_dict(), base / "pytorch_model.bin")
        os.remove(base / "model.safetensors")
    adapter = save_adapter(base, tmp_path / "adapter")
    limit = 50_000  # embed_tokens / lm_head (300 x 64 x 4 bytes = 76.8 kB) are over it: a shard each
    assert run(base, adapter, tmp_path / "out", "--max-shard-size", str(limit)) == 0
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    names = tensor_names(out)
    assert len(names) == len(set(names)) == len(index["weight_map"])  # every tensor exactly once
    assert set(index["weight_map"]) == set(names) == set(AutoModelForCausalLM.from_pretrained(base).state_dict())
    total = 0
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(shard, "pt") as h:
            sizes = [h.get_tensor(k).nbytes for k in h.keys()]
            assert all(index["weight_map"][k] == shard.name for k in h.keys())
        assert sum(sizes) <= limit or len(sizes) == 1, (shard.name, sizes)
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    assert max_diff(merged_logits(out), peft_logits(base, adapter)) <= 1e-5


def test_max_shard_size_units():
    from common.merging import parse_size
    assert parse_size("2GB") == 2_000_000_000 and parse_size("500MB") == 500_000_000 and parse_size("1234") == 1234


# ------------------------------------------------------------------------------------------------------ tied weights
@pytest.mark.parametrize("lora, tied_after", [
    ({"target_modules": ["q_proj", "v_proj"]}, True),  # embeddings untouched: stay tied, lm_head.weight not written
    ({"target_modules": ["q_proj", "lm_head"]}, False),  # LoRA on the tied lm_head: untie, write both
    ({"target_modules": ["embed_tokens"]}, False),  # LoRA on the tied embedding: the adapter's lm_head keeps the base
    ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, False),  # a trained copy of the tied lm_head
], ids=["untouched", "lora-lm_head", "lora-embedding", "modules_to_save-lm_head"])
def test_tied_embeddings(tmp_path, lora, tied_after):
    base = save_base(tmp_path / "base", tie=True)
    with safe_open(base / "model.safetensors", "pt") as h:
        assert "lm_head.weight" not in h.keys()
    adapter = save_adapter(base, tmp_path / "adapter", **lora)
    assert run(base, adapter, tmp_path / "out") == 0
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tied_after
    assert ("lm_head.weight" in tensor_names(out)) is (not tied_after)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()) is tied_after
    # against PEFT's unmerged model: its merge_and_unload writes into the shared tensor and gets tied pairs wrong
    assert max_diff(logits(merged), peft_logits(base, adapter)) <= 1e-5


# ------------------------------------------------------------------------------------------------------------ verify
def test_verify_reports_fp32_difference_and_passes(tmp_path, base, capsys):
    adapter = save_adapter(base, tmp_path / "adapter", use_dora=True)
    assert run(base, adapter, tmp_path / "out", "--verify") == 0
    text = capsys.readouterr().out
    assert "verify: OK" in text and "max |logit diff|" in text
    from common import merging
    from common.weights import ModelWeights
    plan = merging.plan_merge(ModelWeights(base), merging.load_adapter(adapter), {}, None, "cpu")
    report = merging.verify(plan, tmp_path / "out", "cpu")
    assert report["ok"] and report["max_abs_diff"] <= 1e-4 < report["max_abs_diff_vs_base"]


def test_verify_bf16_output_checks_the_fp32_merge(tmp_path, base, capsys):
    adapter = save_adapter(base, tmp_path / "adapter")
    assert run(base, adapter, tmp_path / "out", "--verify", "--dtype", "bf16") == 0
    text = capsys.readouterr().out
    assert "written bfloat16 model vs PEFT" in text and "verify: OK" in text


def test_verify_fails_when_adapter_changes_nothing(tmp_path, base, capsys):
    adapter = save_adapter(base, tmp_path / "adapter", zero_b=True)
    assert run(base, adapter, tmp_path / "out", "--verify") == 1
    assert "the adapter changes nothing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_a_merge_that_fills_the_disk_leaves_nothing(tmp_path, base):
    """The disk fills up while the shards are written (tests/small_disk.py: at a third of the base's size): one line
    naming the output and exit 2, and no output directory, whole or partial."""
    from tests.small_disk import one_line_exit_2, run_on_a_small_disk

    adapter = save_adapter(base, tmp_path / "adapter")
    limit = sum(f.stat().st_size for f in base.glob("*.safetensors")) // 3
    proc = run_on_a_small_disk("merge.py", base, adapter, tmp_path / "out", limit=limit)
    assert one_line_exit_2(proc) and f"{tmp_path / 'out'}: not written" in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_killed_merges_leftovers_go_at_the_next_run_and_a_live_ones_stay(tmp_path, base, capsys):
    """merge.py killed outright (SIGKILL, the OOM killer) leaves `.out.tmp-PID` beside OUT with the shards written so
    far; the next merge into OUT removes it, and says so. A writer still running keeps its own."""
    import signal
    import subprocess
    import sys

    adapter = save_adapter(base, tmp_path / "adapter")
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        left, running = tmp_path / f".out.tmp-{killed.pid}", tmp_path / f".out.tmp-{live.pid}"
        for folder in (left, running):
            folder.mkdir()
            (folder / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1024)
        capsys.readouterr()
        assert run(base, adapter, tmp_path / "out") == 0
        err = capsys.readouterr().err
        assert not left.exists() and running.is_dir()
        assert f"note: removed {left}, left by an earlier process ({killed.pid})" in err
        assert str(running) not in err and (tmp_path / "out" / "config.json").is_file()
    finally:
        live.kill()
        live.wait()


def test_verify_catches_a_wrong_merge(tmp_path, base):
    """A merged model that is not base + the adapter fails verify: here the same A and B merged at half the scale
    (lora_alpha 4 instead of 8), as a merge that got the scaling wrong would write it."""
    from common import merging
    from common.weights import ModelWeights

    adapter = save_adapter(base, tmp_path / "adapter")
    half = save_adapter(base, tmp_path / "half", lora_alpha=4)  # the same seed: the same A and B
    assert run(base, half, tmp_path / "out") == 0
    plan = merging.plan_merge(ModelWeights(base), merging.load_adapter(adapter), {}, None, "cpu")
    report = merging.verify(plan, tmp_path / "out", "cpu")
    assert not report["ok"] and report["max_abs_diff"] > 1e-2, report
    right = merging.verify(merging.plan_merge(ModelWeights(base), merging.load_adapter(half), {}, None, "cpu"),
                           tmp_path / "out", "cpu")
    assert right["ok"], right  # the same files verify against the adapter they were merged from


# -------------------------------------------------------------------------------------------- defaults: latest run
def test_no_arguments_merges_latest_run_final_into_merged(tmp_path, base, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "work_dirs" / "demo"
    adapter = save_adapter(base, run_dir / artifacts.FINAL_DIR)
    tok = tiny_tokenizer()
    tok.chat_template = "{{ 'trained template' }}"  # final/ carries the template used in training
    tok.save_pretrained(adapter)
    (run_dir / artifacts.RECIPE_FILE).write_text(f"model:\n  path: {base}\n  quantization: 4bit\n")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    artifacts.set_latest(run_dir)
    assert run() == 0
    text = capsys.readouterr().out
    assert "4bit" in text and "full-precision base" in text
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(run_dir / artifacts.MERGED_DIR).chat_template == "{{ 'trained template' }}"
    assert run() == 2  # merged/ exists now
    assert "--force" in capsys.readouterr().err
    assert run("--force") == 0  # the adapter alone also works, base from adapter_config.json
    assert run(adapter, "--force") == 0 and (run_dir / artifacts.MERGED_DIR / "config.json").is_file()


# ------------------------------------------------------------------------------------------------------- bad inputs
def test_full_model_is_not_an_error(tmp_path, base, capsys):
    assert run(base) == 0
    assert "already a full model" in capsys.readouterr().out


def test_mismatched_base_lists_modules_and_shapes(tmp_path, base, capsys):
    adapter = save_adapter(base, tmp_path / "adapter")
    other = save_base(tmp_path / "other", hidden=32)
    capsys.readouterr()
    assert run(other, adapter, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: adapter") and "does not match base" in err
    assert "model.layers.0.self_attn.q_proj: base weight [32, 32] does not fit LoRA A [4, 64] / B [64, 4]" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["{base}", "{adapter}"], "expected BASE ADAPTER OUT"),
    (["{base}", "{tmp}/missing", "{tmp}/out"], "adapter directory not found"),
    (["{tmp}/nowhere", "{adapter}", "{tmp}/out"], "base model directory not found"),
    (["{base}", "{adapter}", "{tmp}/out", "--max-shard-size", "2GiB"], "--max-shard-size"),
    (["{base}", "{adapter}", "{adapter}", "--force"], "would replace the input"),
    (["{base}", "{adapter}", "{base}"], "would replace the input"),
    (["{base}", "{tmp}", "{tmp}/out"], "not a PEFT adapter directory"),
])
def test_bad_inputs_exit_2_with_one_clear_line(tmp_path, base, capsys, args, message):
    adapter = save_adapter(base, tmp_path / "adapter")
    args = [a.format(base=base, adapter=adapter, tmp=tmp_path) for a in args]
    capsys.readouterr()
    assert run(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_non_lora_adapter_is_refused(tmp_path, base, capsys):
    adapter = save_adapter(base, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    assert run(base, adapter, tmp_path / "out") == 2
    assert "only LoRA adapters" in capsys.readouterr().err


def test_nan_in_adapter_names_the_module(tmp_path, base, capsys):
    adapter = save_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    from safetensors.torch import load_file, save_file
    state = load_file(adapter / "adapter_model.safetensors")
    state["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"][0, 0] = float("nan")
    save_file(state, adapter / "adapter_model.safetensors")
    capsys.readouterr()
    assert run(base, adapter, tmp_path / "out") == 2
    assert "model.layers.1.self_attn.q_proj: the merged weight has NaN or inf" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
