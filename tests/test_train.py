"""train.py end to end on a 2-layer random llama (LoRA, QLoRA, full), packing, eval prompts, checkpoints, resume,
Ctrl-C, bad combinations; and SmolLM2-135M learning for a few steps."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from common import artifacts  # noqa: E402
from common.templates import IGNORE  # noqa: E402

SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct"
PROMPTS = ["最近工作压力很大，晚上总是睡不着，怎么办？", "我和父母总是吵架，觉得他们不理解我。"]


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def write_recipe(tmp_path: Path, model_dir, data_file, name="recipe", **sections) -> Path:
    recipe = {
        "model": {"path": str(model_dir), "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"path": str(data_file), "template": "qwen_chat", "max_length": 128},
        "train": {"output_dir": str(tmp_path / name), "batch_size": 2, "max_steps": 4, "lr": 1e-3, "save_steps": 2,
                  "save_total_limit": 2, "logging_steps": 1, "warmup_ratio": 0.0},
        "evaluation": {"every_n_steps": 3, "prompts": PROMPTS[:1], "max_new_tokens": 6, "temperature": 0.7},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_merge(recipe, sections), allow_unicode=True), encoding="utf-8")
    return path


def run(*argv) -> int:
    try:
        return train.main([str(a) for a in argv])
    except SystemExit as e:  # main_guard: UserError -> exit 2
        return e.code


def adapter_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


# ---------------------------------------------------------------- end to end: LoRA, QLoRA, full


def test_lora_run_writes_a_self_describing_run_dir(tmp_path, monkeypatch, tiny_model_dir, data_file, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.templates import TEMPLATES

    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, tiny_model_dir, data_file, data={"eval_fraction": 0.25})
    assert run(recipe) == 0
    out = tmp_path / "recipe"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    ckpt = {p.name for p in (out / "checkpoint-4").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
            "recipe.yaml", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= ckpt
    final = out / "final"
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "recipe.yaml"} <= {p.name for p in final.iterdir()}
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template == TEMPLATES["qwen_chat"].chat_template(tok)  # named template exported for chat/merge
    assert yaml.safe_load((final / "recipe.yaml").read_text())["data"]["template"] == "qwen_chat"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final)  # loads as PEFT
    assert (tmp_path / "work_dirs" / "latest").resolve() == out.resolve()

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"} <= set(train_rows[0])
    assert any("eval_loss" in r for r in rows)  # eval_fraction gave an eval set, evaluated at step 3 and the end
    assert (out / "loss.png").stat().st_size > 1000
    assert list((out / "runs").rglob("events.out.tfevents.*"))
    # before training, every_n_steps (3), each save (2, 4) and the end (4, already written)
    assert sorted(p.name for p in (out / "eval_outputs").iterdir()) == ["step_0.txt", "step_2.txt", "step_3.txt", "step_4.txt"]
    assert PROMPTS[0] in (out / "eval_outputs" / "step_4.txt").read_text(encoding="utf-8")
    log = (out / "train.log").read_text(encoding="utf-8")
    assert "trainable parameters:" in log and "packing efficiency" in log and "effective batch size: 2 x 1" in log
    assert "step 4/4" in log
    # not a TTY here: plain timestamped lines on stdout
    assert any(line.startswith("[20") and "step 2/4" in line for line in capsys.readouterr().out.splitlines())


def test_qlora_4bit_trains_on_cpu(tmp_path, monkeypatch, tiny_model_dir, data_file):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, tiny_model_dir, data_file, model={"quantization": "4bit"}, lora={"use_dora": True},
                          train={"max_steps": 2, "save_steps": 10, "gradient_checkpointing": True},
                          evaluation={"prompts": PROMPTS[:1], "every_n_steps": 1})
    assert run(recipe) == 0
    final = tmp_path / "recipe" / "final"
    tensors = adapter_tensors(final)
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["use_dora"]
    assert any("lora_magnitude_vector" in name for name in tensors)
    assert "packing efficiency" in (tmp_path / "recipe" / "train.log").read_text()


def test_8bit_with_rslora_and_bias(tmp_path, monkeypatch, tiny_model_dir, data_file):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, tiny_model_dir, data_file, model={"quantization": "8bit"},
                          lora={"use_rslora": True, "bias": "lora_only", "target_modules": ["q_proj", "v_proj"]},
                          train={"max_steps": 2, "save_steps": 10}, evaluation={"prompts": []})
    assert run(recipe) == 0
    final = tmp_path / "recipe" / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["use_rslora"] and not config["use_dora"] and config["bias"] == "lora_only"
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert not any("mlp" in name for name in adapter_tensors(final))


# What bitsandbytes puts in place of each linear layer of the decoder, and what its weight holds.
QUANTIZED = {"4bit": ("Linear4bit", "Params4bit", torch.uint8), "8bit": ("Linear8bitLt", "Int8Params", torch.int8)}
DECODER_LINEARS = 2 * 7  # 2 layers x q, k, v, o, gate, up, down


def quantized_weights(model, quantization: str) -> dict[str, torch.Tensor]:
    """The stored (quantized) weight of every linear layer in the decoder, after checking its module type and dtype."""
    layer, param, dtype = QUANTIZED[quantization]
    found = {}
    for name, module in model.named_modules():
        if ".layers." in name and isinstance(module, torch.nn.Linear) and not name.split(".")[-2].startswith("lora_"):
            assert (type(module).__name__, type(module.weight).__name__, module.weight.dtype) == (layer, param, dtype), name
            found[name] = module.weight.detach().clone()
    assert len(found) == DECODER_LINEARS, sorted(found)
    return found


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_layers_train_quantized_and_merge_onto_the_full_precision_base(tmp_path, tiny_model_dir, tokenizer,
                                                                                  data_file, quantization):
    """The model train.py loads for `model.quantization` has bitsandbytes layers with packed integer weights, before and
    after training (they are frozen: the same bytes); the LoRA trained on it merges (merge.py) onto the full-precision
    base exactly as PEFT merges it there, not onto the dequantized weights it was trained against."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import merge
    from common import acceleration
    from common.dataset import build_datasets
    from common.modeling import load_model
    from common.recipe import load_recipe
    from common.training import build_trainer, save_final

    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir, data_file, model={"quantization": quantization},
                                      lora={"dropout": 0.0}, train={"max_steps": 2, "save_steps": 10},
                                      evaluation={"prompts": []}))
    model = load_model(recipe, torch.float32)
    before = quantized_weights(model, quantization)
    rows, _, _ = build_datasets(recipe, tokenizer)
    trainer = build_trainer(recipe, model, acceleration.apply(model, recipe), tokenizer, rows, None, [], torch.float32,
                            disable_tqdm=True)
    trainer.train()
    after = quantized_weights(trainer.model, quantization)
    assert all(torch.equal(before[name], after[name]) for name in before)
    final = save_final(trainer, recipe, tokenizer)
    assert any(t.abs().max() > 0 for name, t in adapter_tensors(final).items() if "lora_B" in name)  # it trained

    out = tmp_path / "merged"
    assert merge.main([str(tiny_model_dir), str(final), str(out)]) == 0
    merged = {}
    for shard in out.glob("*.safetensors"):
        merged.update(load_file(shard))
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base = {name: t.clone() for name, t in full.state_dict().items()}
    expected = PeftModel.from_pretrained(full, final).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=0, msg=name)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[q], base[q], atol=1e-4)  # the adapter is in it


def test_full_finetune_saves_a_whole_model(tmp_path, monkeypatch, tiny_model_dir, data_file):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, tiny_model_dir, data_file, lora=None, data={"template": "tokenizer"},
                          train={"max_steps": 2, "save_steps": 2}, evaluation={"prompts": []})
    assert run(recipe) == 0
    final = tmp_path / "recipe" / "final"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    assert not (final / "adapter_config.json").exists()
    assert "sdpa_packed" not in (final / "config.json").read_text()  # training's attention stays in training
    assert (tmp_path / "recipe" / "checkpoint-2" / "model.safetensors").is_file()
    tuned = AutoModelForCausalLM.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def test_dry_run_and_dump_stop_before_loading_weights(tmp_path, monkeypatch, tiny_model_dir, data_file, capsys):
    monkeypatch.chdir(tmp_path)
    weightless = tmp_path / "weightless"  # the model's config and tokenizer, no weights: loading them would fail
    weightless.mkdir()
    for f in tiny_model_dir.iterdir():
        if not f.name.endswith((".safetensors", ".bin")):
            (weightless / f.name).symlink_to(f.resolve())
    recipe = write_recipe(tmp_path, weightless, data_file)
    assert run(recipe, "--dry-run", "data.max_length=64") == 0
    assert "max_length 64" in capsys.readouterr().out
    assert run(recipe, "--dump-dataset", tmp_path / "rows.jsonl") == 0
    first = json.loads((tmp_path / "rows.jsonl").read_text().splitlines()[0])
    assert set(first) == {"input_ids", "labels"}
    assert not (tmp_path / "recipe").exists()
    assert run(recipe, "--dump-dataset", tmp_path / "rows.jsonl") == 2  # exists: not replaced without --force
    assert "--force" in capsys.readouterr().err


# ---------------------------------------------------------------- packing


def test_packed_loss_is_the_token_weighted_mean_of_sample_losses(tmp_path, tiny_model_dir, tokenizer, data_file):
    """Through SFTTrainer's own collator and loss: no attention crosses samples, labels arrive unchanged."""
    from transformers import AutoModelForCausalLM

    from common.acceleration import FastPaths
    from common.recipe import load_recipe
    from common.training import build_trainer

    torch.manual_seed(0)
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir, data_file, lora=None,
                                      data={"max_length": 96, "shuffle_before_pack": False}))
    samples = []
    for n in (30, 41, 35, 20):  # rows of 96: best fit puts 41 + 35 + 20 in row 1 and 30 in row 2, none cut
        ids = torch.randint(10, len(tokenizer), (n,)).tolist()
        samples.append({"input_ids": ids, "labels": [IGNORE] * 7 + ids[7:]})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = build_trainer(recipe, model, FastPaths(), tokenizer, samples, None, [], torch.float32, disable_tqdm=True)
    data = trainer.train_dataset
    assert sorted(map(sorted, data["seq_lengths"])) == [[20, 35, 41], [30]]
    row = max(range(len(data)), key=lambda i: len(data["seq_lengths"][i]))
    lengths, ids, labels = data["seq_lengths"][row], data["input_ids"][row], data["labels"][row]
    pieces, start = [], 0
    for n in lengths:  # every piece is one whole sample, labels unchanged
        piece = (ids[start:start + n], labels[start:start + n])
        assert {"input_ids": piece[0], "labels": piece[1]} in samples
        pieces.append(piece)
        start += n

    batch = trainer.data_collator([data[row]])
    assert "attention_mask" not in batch
    assert batch["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    model.eval()
    with torch.no_grad():
        packed = trainer.compute_loss(model, dict(batch)).item()
        losses, counts = [], []
        for ids, labels in pieces:
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]), use_cache=False)
            losses.append(out.loss.item())
            counts.append(sum(label != IGNORE for label in labels[1:]))  # the model shifts labels by one
        expected = sum(loss * n for loss, n in zip(losses, counts)) / sum(counts)
        assert abs(packed - expected) < 1e-4
        # Sensitivity: the same row as one running sequence (attention across samples) gives another loss.
        crossed = dict(batch, position_ids=torch.arange(96)[None])
        assert abs(trainer.compute_loss(model, crossed).item() - expected) > 1e-3


@pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(), reason="run `make demo-model` first (its tokenizer)")
def test_packing_efficiency_on_psych_sample_at_512():
    """With the demo model's tokenizer, as the demo trains: whole samples, >= 97% of the slots filled."""
    from transformers import AutoTokenizer

    from common.formats import load_conversations
    from common.samples import encode_conversations, pack_rows, packing_stats
    from common.templates import get_template

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    conversations = load_conversations([str(ROOT / "data" / "psych_sample.json")])
    rows, _ = encode_conversations(conversations, tokenizer, get_template("tokenizer"), 512, "split")
    packed = pack_rows(rows, 512, shuffle=True, seed=0)
    real = sum(len(r["input_ids"]) for r in rows)
    assert sum(sum(r["seq_lengths"]) for r in packed) == real and all(len(r["input_ids"]) <= 512 for r in packed)
    assert sorted(n for r in packed for n in r["seq_lengths"]) == sorted(len(r["input_ids"]) for r in rows)
    assert real / (len(packed) * 512) >= 0.97
    assert packing_stats(rows, 512, True, 0) == (len(packed), real / (len(packed) * 512))  # --dry-run reports the same


# ---------------------------------------------------------------- evaluation prompts


def test_eval_callback_writes_answers_and_restores_state(tmp_path, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from common.callbacks import EvalPromptsCallback, RunLog
    from common.recipe import EvaluationConfig
    from common.templates import get_template

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.use_cache = False
    model.gradient_checkpointing_enable()
    model.train()
    cfg = EvaluationConfig(prompts=PROMPTS, max_new_tokens=5, temperature=0.8)
    callback = EvalPromptsCallback(tokenizer, get_template("qwen_chat"), cfg, "你是心理咨询师。", tmp_path, RunLog(tmp_path))
    state = torch.random.get_rng_state()
    out = callback.generate(model, 7)
    assert out == tmp_path / "eval_outputs" / "step_7.txt"
    text = out.read_text(encoding="utf-8")
    assert all(p in text for p in PROMPTS) and text.count("### Answer") == 2
    assert model.training and model.config.use_cache is False and model.is_gradient_checkpointing
    assert torch.equal(torch.random.get_rng_state(), state)  # sampling did not move the training RNG
    assert callback.generate(model, 7) is None  # once per step
    assert "step 7" in (tmp_path / "train.log").read_text(encoding="utf-8")


def test_eval_prompt_answers_equal_chat_once_greedy(tmp_path, monkeypatch, tiny_model_dir, data_file, capsys):
    """One generation core: the answer written at the end of training and `chat.py --once` on the finished run are
    the same text for the same prompt (greedy, the run's system prompt and stop words)."""
    import re

    import chat

    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, tiny_model_dir, data_file, data={"system": "你是心理咨询师。"},
                          train={"max_steps": 2, "save_steps": 10},
                          evaluation={"prompts": PROMPTS, "max_new_tokens": 16, "temperature": 0, "every_n_steps": 100})
    assert run(recipe) == 0
    written = (tmp_path / "recipe" / "eval_outputs" / "step_2.txt").read_text(encoding="utf-8")
    answers = re.findall(r"### Answer \d+\n(.*?)\n\n(?=### Prompt|\Z)", written, flags=re.S)
    assert len(answers) == 2 and any(a.strip() for a in answers), answers
    capsys.readouterr()
    for prompt, answer in zip(PROMPTS, answers):
        chat.main(["--once", prompt, "--no-stream"])  # the latest run: final/ on its base, the run's settings
        assert capsys.readouterr().out == answer + "\n"


# ---------------------------------------------------------------- checkpoints, resume, interruption


class Killed(Exception):
    pass


def test_rotation_keeps_the_limit_also_after_a_resume(tmp_path, monkeypatch, tiny_model_dir, data_file):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, tiny_model_dir, data_file, train={"max_steps": 2, "save_steps": 1, "save_total_limit": 3},
                          evaluation={"prompts": []})
    assert run(recipe) == 0  # stands for a run killed after 2 checkpoints
    out = tmp_path / "recipe"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    # Resumed from checkpoint-2: once newer checkpoints are complete it is rotated out like any other.
    assert run(recipe, "train.max_steps=6", "--resume", "auto") == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5", "checkpoint-6"]
    assert not list(out.glob(".saving-*"))
    # Resumed from an older checkpoint than the newest, limit 1: only the newest complete one stays.
    assert run(recipe, "train.max_steps=7", "train.save_total_limit=1", "--resume", out / "checkpoint-5") == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-7"]


def test_resume_after_kills_matches_an_uninterrupted_run(tmp_path, monkeypatch, tiny_model_dir, data_file):
    """Killed after checkpoint-4, then killed while saving checkpoint-6 (written, not yet renamed into place): the
    unfinished save is invisible, resume picks checkpoint-4, and the final adapter equals the uninterrupted run's
    (dropout and sampled eval answers included: the RNG state travels with the checkpoint)."""
    from transformers import TrainerCallback

    class Kill(TrainerCallback):  # train.main runs extra callbacks before the run's own: before the rename on save
        def __init__(self, event: str, step: int):
            self.event, self.step = event, step

        def on_step_begin(self, args, state, control, **kwargs):
            if self.event == "step_begin" and state.global_step == self.step:
                raise Killed

        def on_save(self, args, state, control, **kwargs):
            if self.event == "save" and state.global_step == self.step:
                raise Killed

    monkeypatch.chdir(tmp_path)
    same = dict(train={"max_steps": 6, "save_steps": 2, "save_total_limit": 3},
                evaluation={"prompts": PROMPTS[:1], "every_n_steps": 1})
    assert run(write_recipe(tmp_path, tiny_model_dir, data_file, name="whole", **same)) == 0
    killed = write_recipe(tmp_path, tiny_model_dir, data_file, name="killed", **same)
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train.main([str(killed)], extra_callbacks=[Kill("step_begin", 4)])  # after checkpoint-4 is complete
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    with pytest.raises(Killed):
        train.main([str(killed), "--resume", "auto"], extra_callbacks=[Kill("save", 6)])
    assert (artifacts.staging_dir(out) / "checkpoint-6").is_dir() and not (out / "checkpoint-6").exists()
    assert run(killed, "--resume", "auto") == 0
    assert "resuming from" in (out / "train.log").read_text() and not list(out.glob(".saving-*"))

    expected, got = adapter_tensors(tmp_path / "whole" / "final"), adapter_tensors(out / "final")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-5, rtol=0), name
    assert not torch.allclose(expected[name], torch.zeros_like(expected[name]))


def test_sigint_saves_a_checkpoint_and_exits_130(tmp_path, monkeypatch, tiny_model_dir, data_file, request):
    from transformers import TrainerCallback

    monkeypatch.chdir(tmp_path)
    # as in a terminal, whatever started pytest (a background job starts with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))

    class CtrlCDuringStep3(TrainerCallback):  # train.main's extra callbacks run before the run's own
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGINT)  # delivered to the handler before the run's check

    recipe = write_recipe(tmp_path, tiny_model_dir, data_file, train={"max_steps": 10, "save_steps": 100},
                          evaluation={"prompts": []})
    assert train.main([str(recipe)], extra_callbacks=[CtrlCDuringStep3()]) == 130
    out = tmp_path / "recipe"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    assert not (out / "final").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    assert "--resume auto" in (out / "train.log").read_text()


def start_train(tmp_path: Path, recipe: Path) -> subprocess.Popen:
    """train.py RECIPE as a user starts it, in its own process: SIGINT at its default (a background job inherits it
    ignored), one thread (two of these share the CPU), stdout and stderr to RECIPE.out."""
    with open(recipe.with_suffix(".out"), "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, str(ROOT / "train.py"), str(recipe)], cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(proc: subprocess.Popen, path: Path, text: str, output: Path, timeout: float = 120) -> None:
    """Poll path until it contains text; the process must still be running (else its output is shown)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(encoding="utf-8"):
            return
        assert proc.poll() is None, f"exited {proc.returncode} before {text!r}: " + output.read_text()[-3000:]
        time.sleep(0.01)
    pytest.fail(f"no {text!r} in {path} after {timeout} s")


def test_sigterm_and_a_second_ctrl_c_on_real_processes(tmp_path, tiny_model_dir, data_file):
    """`kill PID` saves a checkpoint after the current step and exits 143, with the resume hint; Ctrl-C and Ctrl-C
    again aborts at once (the second gets Python's own handler, KeyboardInterrupt), leaving no half-written checkpoint
    and no resume hint. Two real train.py processes, started together so that their start-ups overlap."""
    endless = dict(train={"max_steps": 100_000, "save_steps": 100_000})
    term = write_recipe(tmp_path, tiny_model_dir, data_file, name="term", evaluation={"prompts": []}, **endless)
    # Answers written at the save make the time from the first Ctrl-C to a normal exit long: the second one lands
    # before it, wherever it lands.
    twice = write_recipe(tmp_path, tiny_model_dir, data_file, name="twice",
                         evaluation={"prompts": PROMPTS[:1], "max_new_tokens": 64, "every_n_steps": 100_000}, **endless)
    procs = [start_train(tmp_path, term), start_train(tmp_path, twice)]
    try:
        wait_for(procs[0], tmp_path / "term" / "train.log", "step 2/", tmp_path / "term.out")
        procs[0].send_signal(signal.SIGTERM)
        wait_for(procs[1], tmp_path / "twice" / "train.log", "step 2/", tmp_path / "twice.out")
        procs[1].send_signal(signal.SIGINT)
        wait_for(procs[1], tmp_path / "twice.out", "SIGINT: saving a checkpoint after this step", tmp_path / "twice.out")
        procs[1].send_signal(signal.SIGINT)
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    out, log = tmp_path / "term", (tmp_path / "term" / "train.log").read_text()
    assert codes[0] == 128 + signal.SIGTERM, (tmp_path / "term.out").read_text()[-3000:]
    assert "SIGTERM: saving a checkpoint after this step" in (tmp_path / "term.out").read_text()
    step = int(log.split("interrupted by SIGTERM at step ")[1].split(":")[0])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{step}"] and step >= 2
    assert json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["global_step"] == step
    assert "--resume auto" in log and not (out / "final").exists()

    out, log = tmp_path / "twice", (tmp_path / "twice" / "train.log").read_text()
    assert codes[1] == -signal.SIGINT, (tmp_path / "twice.out").read_text()[-3000:]
    assert "KeyboardInterrupt" in (tmp_path / "twice.out").read_text()
    assert "stopped at step" not in log and not (out / "final").exists()
    for checkpoint in out.glob("checkpoint-*"):  # one renamed into place before the abort is complete
        assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "adapter_model.safetensors").is_file()


def test_a_checkpoint_that_fills_the_disk_is_one_line_and_leaves_nothing(tmp_path, tiny_model_dir, data_file):
    """The disk fills up while checkpoint-1 is saved (tests/small_disk.py: 60 KB a file lets the adapter, 36 KB,
    through and stops torch.save of the optimizer state, 89 KB, mid-file): one line naming the checkpoint and
    exit 2, never torch's "unexpected pos" traceback; nothing half-written is left to be taken for a checkpoint."""
    from tests.small_disk import run_on_a_small_disk

    recipe = write_recipe(tmp_path, tiny_model_dir, data_file, lora={"dropout": 0.0},
                          train={"max_steps": 2, "save_steps": 1}, evaluation={"prompts": []})
    proc = run_on_a_small_disk("train.py", recipe, limit=60_000)
    run_dir = tmp_path / "recipe"
    # stderr also has the weight loader's progress bar: the error is its one last line
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(error) == 1, proc.stderr[-3000:]
    assert proc.stderr.rstrip().endswith(error[0])
    assert error[0].startswith(f"error: {run_dir / 'checkpoint-1'}: not written (torch.save stopped mid-file")
    assert "--resume auto" in proc.stderr
    assert not list(run_dir.glob("checkpoint-*")) and not list(run_dir.glob(".saving-*"))


def test_an_ignored_sigint_stays_ignored(tmp_path, monkeypatch, tiny_model_dir, data_file, request):
    monkeypatch.chdir(tmp_path)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    from transformers import TrainerCallback

    seen = []

    class Handler(TrainerCallback):  # the SIGINT handler during each step, as the run's own callbacks see it
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(signal.getsignal(signal.SIGINT))

    recipe = write_recipe(tmp_path, tiny_model_dir, data_file, train={"max_steps": 1}, evaluation={"prompts": []})
    assert train.main([str(recipe)], extra_callbacks=[Handler()]) == 0
    assert seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("overrides, message", [
    (["lora=null", "model.quantization=4bit"], "quantization"),
    (["model.dtype=float16"], "float16` needs a GPU"),
    (["model.quantization=8bit", "lora.use_dora=true"], "use 4bit or drop DoRA"),
    (["train.deepspeed=zero2"], "train.deepspeed"),
    (["train.deepspeed=nope.json"], "neither zero2, zero3 nor an existing JSON file"),
    (["train.deepspeed=zero3"], "`evaluation.prompts` cannot be answered during training under ZeRO-3"),
    (["train.fsdp=full_shad"], "expected full_shard | shard_grad_op or null (did you mean `full_shard`?)"),
    (["train.fsdp=full_shard", "evaluation.prompts=[]"], "`train.fsdp` needs CUDA GPUs"),
    (["train.fsdp=full_shard"], "`evaluation.prompts` cannot be answered during training under `train.fsdp`"),
    (["train.fsdp=shard_grad_op", "model.quantization=4bit"], "`train.fsdp` with `model.quantization` (QLoRA)"),
    (["train.fsdp=shard_grad_op", "train.deepspeed=zero2"], "`train.fsdp` and `train.deepspeed` both shard"),
    (["train.scheduler=cosine_sometimes"], "unknown scheduler"),
    (["train.warmup_ratio=1.5"], "warmup_ratio"),
    (["--resume", "no/such/dir"], "--resume no/such/dir"),
    (["model.path=/no/such/model"], "model.path"),
])
def test_bad_combinations_fail_with_one_clear_line(tmp_path, monkeypatch, tiny_model_dir, data_file, capsys,
                                                   overrides, message):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, tiny_model_dir, data_file)
    assert run(recipe, *overrides) == 2
    err = capsys.readouterr().err
    assert any(line.startswith("error: ") for line in err.splitlines()) and message in err and "Traceback" not in err


def test_an_earlier_run_is_not_overwritten(tmp_path, monkeypatch, tiny_model_dir, data_file, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe" / "final").mkdir(parents=True)
    recipe = write_recipe(tmp_path, tiny_model_dir, data_file)
    assert run(recipe) == 2
    assert "--resume auto continues it, --force starts over" in capsys.readouterr().err


def test_deepspeed_json_is_validated_with_the_recipe(tmp_path):
    from common.cli import UserError
    from common.recipe import from_dict

    bad = tmp_path / "ds.json"
    raw = {"model": {"path": str(tmp_path)}, "data": {"path": "d.json"}, "train": {"deepspeed": str(bad), "warmup_ratio": 2}}
    bad.write_text('{"zero_optimization": {"stage": 7}}')
    with pytest.raises(UserError, match="zero_optimization.stage") as e:
        from_dict(raw)
    assert "`train.warmup_ratio`" in str(e.value)  # reported together with the recipe's other problems
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        from_dict(raw)


# ---------------------------------------------------------------- the real model (more processes: test_distributed.py)


@pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(), reason="run `make demo-model` first")
def test_smollm2_loss_falls(tmp_path, monkeypatch, data_file):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, SMOLLM2, data_file, model={"dtype": "auto"}, lora={"r": 8, "alpha": 16, "dropout": 0.0},
                          data={"template": "tokenizer", "max_length": 256},
                          train={"batch_size": 1, "max_steps": 8, "lr": 1e-3, "save_steps": 100},
                          evaluation={"prompts": PROMPTS[:1], "max_new_tokens": 8, "every_n_steps": 100})
    assert run(recipe) == 0
    rows = [json.loads(line) for line in (tmp_path / "recipe" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses
