"""train.method grpo: prompts from every file kind encoded as SFT encodes them, the recipe checks, a tiny end-to-end
run (checkpoints, resume, final/, rewards logged one by one), and the per-step loss against plain TRL GRPOTrainer on
the same completions (float32, 1e-4)."""
import copy
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from common.cli import UserError  # noqa: E402
from common.conversation import Turn  # noqa: E402
from common.prompts import encode_prompts, load_prompts, messages_prompt_ids  # noqa: E402
from common.templates import IGNORE, get_template  # noqa: E402
import train  # noqa: E402
from test_preference import CHATML_NO_SEP, KillAt, Killed, metrics  # noqa: E402
from test_train import adapter_tensors, run, write_recipe  # noqa: E402

PROMPTS_FILE = ROOT / "data" / "psych_prompts_heldout.json"
REWARDS = [{"repetition": {"n": 2}}, {"length": {"min": 4, "max": 12, "unit": "tokens"}, "weight": 0.5},
           {"language": {}}, {"ending": {}}]


def grpo_recipe(tmp_path, model_dir, prompts_file, name="recipe", **sections):
    base = dict(data={"path": str(prompts_file), "template": "tokenizer", "max_length": 128, "pack": False},
                train={"method": "grpo", "max_steps": 4, "save_steps": 2, "lr": 5e-3, "batch_size": 4},
                grpo={"num_generations": 4, "max_completion_length": 12}, evaluation={"every_n_steps": 4},
                rewards=REWARDS)
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return write_recipe(tmp_path, model_dir, prompts_file, name=name, **base)


# ---------------------------------------------------------------- prompts


def test_prompts_from_every_file_kind(tmp_path, tokenizer):
    conversations = json.loads((ROOT / "data" / "psych_sample.json").read_text("utf-8"))[:2]
    (tmp_path / "conv.json").write_text(json.dumps(conversations, ensure_ascii=False), "utf-8")
    prompts = load_prompts([str(tmp_path / "conv.json")])
    assert len(prompts) == sum(len(c["conversation"]) for c in conversations)  # each user turn with its context
    second = prompts[1].turns
    first_turn = conversations[0]["conversation"][0]
    assert second[0].input == first_turn["input"] and second[0].output == first_turn["output"]
    assert second[-1].output is None and second[0].system == first_turn["system"]
    pairs = load_prompts([str(ROOT / "data" / "psych_pairs.json")])
    assert pairs and all(p.turns[-1].output is None for p in pairs)
    only = load_prompts([str(PROMPTS_FILE)])
    assert len(only) == 16 and only[3].turns[0].output and only[3].turns[-1].output is None
    (tmp_path / "plain.jsonl").write_text('{"prompt": "我睡不着", "system": "你是咨询师"}\n', "utf-8")
    (plain,) = load_prompts([str(tmp_path / "plain.jsonl")])
    assert plain.turns == [Turn("我睡不着", None, "你是咨询师")]


@pytest.mark.parametrize("name", ["qwen_chat", "tokenizer"])
def test_prompt_ids_are_what_sft_encodes_before_the_answer(tokenizer, name):
    """Token for token: the prompt's ids are the SFT encoding of the same turns up to the answer's first label."""
    template = get_template(name)
    if name == "tokenizer":  # a copy: the session's tokenizer is every later test's (test_preference failed after this)
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = CHATML_NO_SEP
    prompts = load_prompts([str(PROMPTS_FILE)])
    rows, stats = encode_prompts(prompts, tokenizer, template, budget=1000)
    assert stats.prompts == 16 and stats.dropped == 0
    for prompt, row in zip(prompts, rows):
        answered = prompt.turns[:-1] + [Turn(prompt.turns[-1].input, "好的", prompt.turns[-1].system)]
        ids, labels = template.encode_ids(tokenizer, answered)
        first = next(i for i in range(len(labels)) if labels[i] != IGNORE and i >= len(ids) - 10)
        assert row["prompt_ids"] == ids[:first]
        assert messages_prompt_ids(tokenizer, template, row["prompt"]) == row["prompt_ids"]  # what the rollout sees


def test_long_prompts_lose_earlier_turns_or_are_dropped(tokenizer):
    template = get_template("qwen_chat")
    prompts = load_prompts([str(PROMPTS_FILE)])
    multi = [p for p in prompts if len(p.turns) > 1][0]
    whole = len(template.encode_ids(tokenizer, multi.turns)[0])
    rows, stats = encode_prompts([multi], tokenizer, template, budget=whole - 1)
    assert stats.shortened == 1 and len(rows[0]["prompt"]) < len(multi.messages)
    assert rows[0]["prompt"][0]["role"] == "system"  # the system prompt stays
    rows, stats = encode_prompts([multi], tokenizer, template, budget=5)
    assert rows == [] and stats.dropped == 1


def test_a_group_shares_its_prefill_and_samples_as_each_row_alone(tiny_model_dir, tokenizer):
    """The fast rollout's group: one prefill of the prompt, each completion sampled as it would be alone."""
    from transformers import AutoModelForCausalLM

    from common.decoding import Decoder, Row
    from common.grpo import groups

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompt = tokenizer.encode("我最近总是睡不着，怎么办？")
    rows = lambda: [Row(prompt, 10, frozenset({tokenizer.eos_token_id}), greedy=False, seed=s)  # noqa: E731
                    for s in range(4)]
    alone = [Decoder(model).run(r).answer for r in rows()]
    decoder, group = Decoder(model), rows()
    assert decoder.add(Row(prompt[:5], 10, frozenset(), greedy=False, seed=9)) is False  # a row already under way
    assert decoder.add_alike(group) == group
    while decoder.rows:
        decoder.step()
    assert [r.answer for r in group] == alone and len({tuple(a) for a in alone}) > 1
    assert groups([[1], [1], [2], [2], [1]]) == [(0, 2), (2, 4), (4, 5)]


# ---------------------------------------------------------------- recipe checks


@pytest.mark.parametrize("overrides, message", [
    (["train.batch_size=3"], "must be a multiple of `grpo.num_generations` (4)"),
    (["grpo.num_generations=1", "train.batch_size=1"], "`grpo.num_generations`: got 1, expected at least 2"),
    (["grpo.max_completion_length=126"], "leaves no room for a prompt"),
    (["grpo.temperature=0"], "`grpo.temperature` must be > 0"),
    (["grpo.loss_type=ppo"], "`grpo.loss_type`: got 'ppo', expected dapo | grpo"),
    (["grpo.num_generation=8"], "unknown key `grpo.num_generation` (did you mean `grpo.num_generations`?)"),
    (["rewards=[]"], "train.method grpo learns from `rewards:`"),
    (["data.pack=true"], "`data.pack`: train.method grpo trains on prompts"),
    (["train.method=dpo"], "`grpo.max_completion_length` applies to train.method grpo, not dpo"),
    (["data.max_length=100000000", "train.batch_size=64"], "GiB (weights, and logits over 64 x 100000000 tokens)"),
])
def test_grpo_recipe_problems(tmp_path, tiny_model_dir, overrides, message):
    from common.methods.table import load_recipe

    with pytest.raises(UserError) as e:
        load_recipe(grpo_recipe(tmp_path, tiny_model_dir, PROMPTS_FILE), overrides)
    assert message in str(e.value)


def test_dry_run_shows_the_first_prompt_and_the_rewards(tmp_path, monkeypatch, tiny_model_dir, capsys):
    monkeypatch.chdir(tmp_path)
    assert run(grpo_recipe(tmp_path, tiny_model_dir, PROMPTS_FILE), "--dry-run") == 0
    out = capsys.readouterr().out
    assert "method grpo" in out and "prompts of up to 116 tokens" in out
    assert "rewards: repetition(n=2) x1; length(min=4, max=12, unit=tokens) x0.5; language() x1; ending() x1" in out
    assert "我最近总是睡不着" in out


# ---------------------------------------------------------------- training through train.py


def test_grpo_run_end_to_end_and_resume(tmp_path, monkeypatch, tiny_model_dir, capsys):
    monkeypatch.chdir(tmp_path)
    assert run(grpo_recipe(tmp_path, tiny_model_dir, PROMPTS_FILE, name="whole")) == 0
    out = tmp_path / "whole"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "recipe.yaml"} <= {
        p.name for p in (out / "final").iterdir()}
    steps = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for name in ("repetition", "length", "language", "ending"):
        assert f"rewards/{name}/mean" in steps[0], steps[0].keys()
    assert "reward" in steps[0] and "completions/mean_length" in steps[0]
    log = (out / "train.log").read_text(encoding="utf-8")
    assert "method: grpo" in log and "grpo: groups of 4 completions of up to 12 tokens, 1 prompt(s) a step" in log
    assert "rewards: repetition(n=2) x1" in log and "rollouts by the batched decoder" in log
    assert (out / "eval_outputs" / "step_4.txt").is_file() and list((out / "runs").rglob("events.out.tfevents.*"))

    # then merge as any run (the recipe saved with the run, rewards and all, reads back for it)
    import merge

    assert merge.main([str(out / "final")]) == 0 and (out / "merged" / "config.json").is_file()
    # eval.py on the run: each reward's mean on the held-out prompts, base vs tuned (prompts alone have no loss)
    import eval as evaluate

    assert evaluate.main([str(out), "--data", str(PROMPTS_FILE), "--max-new-tokens", "6"]) == 0
    said = capsys.readouterr().out
    assert "held-out loss: none (the held-out data has no answers" in said and "held-out loss over" not in said
    report = json.loads((out / "eval" / "report.json").read_text("utf-8"))
    table = report["rewards"]
    assert table["prompts"] == 16 and len(table["answers"]) == 16
    for who in ("base", "tuned"):
        assert set(table[who]["rewards"]) == {"repetition", "length", "language", "ending"}
        assert 0 <= table[who]["repeated_4gram_share"] <= 1 and table[who]["cut_at_limit"] <= 16
    markdown = (out / "eval" / "report.md").read_text("utf-8")
    assert "on 16 held-out prompts, mean per reward" in markdown and "| repeated 4-gram share |" in markdown

    resumed = grpo_recipe(tmp_path, tiny_model_dir, PROMPTS_FILE, name="resumed")
    with pytest.raises(Killed):
        train.main([str(resumed)], extra_callbacks=[KillAt(2)])
    assert run(resumed, "--resume", "auto") == 0
    assert "resuming from" in (tmp_path / "resumed" / "train.log").read_text()
    assert (tmp_path / "resumed" / "final" / "adapter_model.safetensors").is_file()


def test_trl_generation_path(tmp_path, monkeypatch, tiny_model_dir):
    """grpo.fast_rollouts: false samples with TRL's own generate() from our prompt ids."""
    monkeypatch.chdir(tmp_path)
    assert run(grpo_recipe(tmp_path, tiny_model_dir, PROMPTS_FILE, train={"max_steps": 1},
                           grpo={"fast_rollouts": False}, evaluation={"prompts": []})) == 0
    assert "rollouts by TRL generate()" in (tmp_path / "recipe" / "train.log").read_text("utf-8")
    assert [r["step"] for r in metrics(tmp_path / "recipe") if "loss" in r] == [1]


RECORDER = '''import json, os


def record(prompts, completions, completion_ids, **kwargs):
    """Writes what it was given (the run's completions, for the replay), and scores length."""
    with open(os.environ["GRPO_RECORD"], "a", encoding="utf-8") as f:
        f.write(json.dumps({"prompts": prompts, "completion_ids": completion_ids}, ensure_ascii=False) + "\\n")
    return [len(ids) / 12 for ids in completion_ids]
'''


def test_loss_equals_plain_trl_grpo_on_the_same_completions(tmp_path, monkeypatch, tiny_model_dir):
    """train.py's run records each step's completions (a `python` reward); plain GRPOTrainer, given the same PEFT model
    and the same rewards, replays them through TRL's public rollout_func, with the prompts tokenized by TRL itself
    (apply_chat_template: equal to ours under a separator-free ChatML). Every step's loss, reward and the per-reward
    means agree (float32, 1e-4), so the loss is TRL's, untouched."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import GRPOConfig, GRPOTrainer

    from common.methods.table import load_recipe
    from common.rewards import reward_functions

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "grpo_record.py").write_text(RECORDER, "utf-8")
    monkeypatch.setenv("GRPO_RECORD", str(tmp_path / "ours.jsonl"))
    model_dir = tmp_path / "model"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = CHATML_NO_SEP
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    steps, lr = 3, 2e-2
    rewards = [*REWARDS[:3], {"python": "grpo_record:record"}]
    path = grpo_recipe(tmp_path, model_dir, PROMPTS_FILE, lora={"r": 4, "alpha": 8, "dropout": 0.0},
                       data={"max_length": 256}, rewards=rewards,
                       train={"max_steps": steps, "lr": lr, "save_steps": 100, "warmup_ratio": 0.0},
                       evaluation={"prompts": []})
    assert run(path) == 0
    ours = [r for r in metrics(tmp_path / "recipe") if "loss" in r]
    recorded = [json.loads(line) for line in (tmp_path / "ours.jsonl").read_text("utf-8").splitlines()]
    assert len(recorded) == steps

    calls = iter(recorded)

    def replay(prompts, trainer):
        call = next(calls)
        assert prompts == call["prompts"]  # the same prompts in the same order (the sampler's seed)
        prompt_ids = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)
                      ["input_ids"] for p in prompts]
        assert prompt_ids == [messages_prompt_ids(tok, get_template("tokenizer"), p) for p in prompts]
        return {"prompt_ids": prompt_ids, "completion_ids": call["completion_ids"], "logprobs": None}

    monkeypatch.setenv("GRPO_RECORD", str(tmp_path / "plain.jsonl"))
    recipe = load_recipe(path)
    set_seed(42)  # as train.py seeds before the LoRA init
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                      task_type="CAUSAL_LM"))
    args = GRPOConfig(output_dir=str(tmp_path / "plain"), max_steps=steps, learning_rate=lr,
                      per_device_train_batch_size=4, num_generations=4, max_completion_length=12,
                      lr_scheduler_type="cosine", warmup_steps=0, logging_steps=1, report_to="none", use_cpu=True,
                      bf16=False, save_strategy="no", seed=42, optim="adamw_torch", data_seed=42,
                      reward_weights=[e.weight for e in recipe.rewards])
    plain = GRPOTrainer(model=model, args=args, processing_class=tok, rollout_func=replay,
                        reward_funcs=reward_functions(recipe.rewards, tok, get_template("tokenizer")),
                        train_dataset=Dataset.from_list([{"prompt": r["prompt"]} for r in json.loads(
                            PROMPTS_FILE.read_text("utf-8"))]))
    plain.train()
    theirs = [h for h in plain.state.log_history if "loss" in h]
    assert len(theirs) == len(ours) == steps
    for mine, trl in zip(ours, theirs):
        for key in ("loss", "reward", "rewards/repetition/mean", "rewards/length/mean", "rewards/python/mean"):
            assert mine[key] == pytest.approx(trl[key], abs=1e-4), (mine["step"], key)
        # the gradient too: on-policy, GRPO's loss is near 0 whatever the weights (its ratio is 1); its gradient is not
        assert mine["grad_norm"] == pytest.approx(trl["grad_norm"], rel=1e-4), mine["step"]
    assert any(abs(r["loss"]) > 1e-3 for r in ours) and all(r["grad_norm"] > 1e-3 for r in ours)
