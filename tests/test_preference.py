"""Preference tuning (train.method dpo | orpo): the pair readers of the four peer formats and their errors, the
encoding (token for token TRL's chat-template tokenization and the SFT encoder), DPO and ORPO runs through train.py
on the tiny model (run directory, metrics, resume, continued adapters, full fine-tuning), the loss against plain TRL
DPOTrainer, and eval.py's preference accuracy."""
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.cli import UserError  # noqa: E402
from common.pairs import Pair, encode_pair, encode_pairs, load_pairs  # noqa: E402
from common.conversation import Turn  # noqa: E402
from common.templates import IGNORE, TEMPLATES, get_template  # noqa: E402
import train  # noqa: E402
from test_train import adapter_tensors, run, write_recipe  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct"
# ChatML without the newline after <|im_end|>: TRL then scores exactly the tokens SFT labels (the answer and its
# end-of-turn), so its rows and ours are the same rows.
CHATML_NO_SEP = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Ten of the shipped counselling pairs (two of them multi-turn): enough for a few steps, fast to encode."""
    records = json.loads((ROOT / "data" / "psych_pairs.json").read_text(encoding="utf-8"))
    multi = [r for r in records if sum(m["role"] == "user" for m in r["prompt"]) > 1]
    path = tmp_path_factory.mktemp("pairs") / "pairs.json"
    path.write_text(json.dumps(records[:8] + multi[:2], ensure_ascii=False), encoding="utf-8")
    return path


def pair_recipe(tmp_path, model_dir, pairs, name="recipe", **sections):
    base = dict(data={"path": str(pairs), "template": "tokenizer", "max_length": 256, "pack": False},
                train={"method": "dpo", "max_steps": 4, "save_steps": 2, "lr": 5e-3}, evaluation={"every_n_steps": 4})
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return write_recipe(tmp_path, model_dir, pairs, name=name, **base)


class Killed(Exception):
    pass


class KillAt(TrainerCallback):
    """A run killed at the start of the step after `step` (train.main runs extra callbacks before the run's own)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- readers: the four formats, auto-detected


def test_the_four_peer_formats_are_detected_and_read():
    conversational = load_pairs([FIXTURES / "pairs_conversational.jsonl"])
    assert [(t.input, t.output, t.system) for t in conversational[0].prompt] == [
        ("Who won the world series in 2020?", "The Los Angeles Dodgers won the World Series in 2020.",
         "You are a helpful assistant."), ("Where was it played?", None, None)]
    assert conversational[0].rejected == "I don't know."
    # TRL's implicit prompt (both sides whole conversations) reads as the explicit one
    assert conversational[2] == conversational[1] == Pair([Turn("What color is the sky?", None)], "It is blue.",
                                                          "It is green.")
    plain = load_pairs([FIXTURES / "pairs_trl_plain.json"])
    assert plain[0] == Pair([Turn("The sky is", None)], " blue.", " green.")
    sharegpt = load_pairs([FIXTURES / "pairs_llamafactory_sharegpt.json"])
    assert sharegpt[0].prompt == [Turn("构建一个逻辑推理链。", None)] and sharegpt[0].chosen.startswith("逻辑推理链是")
    assert sharegpt[1].prompt[0].system.startswith("你是一个非常聪明的AI助手")
    alpaca = load_pairs([FIXTURES / "pairs_llamafactory_alpaca.json"])
    assert alpaca[0].prompt == [Turn("用一句话安慰一位考试失利的朋友。", None)]  # empty input: the instruction alone
    assert alpaca[1].prompt == [Turn("你好", "你好，请问需要我做什么？", "你是一名情绪识别助手。"),
                                Turn("判断下面这句话的情绪。\n我已经三天没睡好了，什么都不想做。", None)]
    # one call reads them all, each file in its own format, in order
    every = load_pairs([FIXTURES / f for f in ("pairs_conversational.jsonl", "pairs_trl_plain.json",
                                               "pairs_llamafactory_sharegpt.json", "pairs_llamafactory_alpaca.json")])
    assert every == conversational + plain + sharegpt + alpaca


def test_a_jsonl_file_of_one_pair_is_one_record(tmp_path):
    # The web page's ratings.jsonl after its first rating: one line, one object (a .json file of one object that is
    # not a conversation is still refused as not a list of records).
    first = (FIXTURES / "pairs_conversational.jsonl").read_text(encoding="utf-8").splitlines()[0]
    (tmp_path / "ratings.jsonl").write_text(first + "\n", encoding="utf-8")
    assert load_pairs([tmp_path / "ratings.jsonl"]) == load_pairs([FIXTURES / "pairs_conversational.jsonl"])[:1]


def test_shipped_pairs_read_and_fit_smollm2_at_512():
    from common.modeling import load_tokenizer

    if not SMOLLM2.is_dir():
        pytest.skip("SmolLM2 not downloaded (make demo-model)")
    train = load_pairs([ROOT / "data" / "psych_pairs.json"])
    held_out = load_pairs([ROOT / "data" / "psych_pairs_heldout.json"])
    assert len(train) == 71 and len(held_out) == 16
    assert sum(len(p.prompt) > 1 for p in train) == 10 and not {p.prompt[-1].input for p in train} & {
        p.prompt[-1].input for p in held_out}
    rows, stats = encode_pairs(train, load_tokenizer(SMOLLM2), get_template("tokenizer"), 512)
    assert stats.pairs == 71 and stats.shortened == stats.dropped == 0


BROKEN = {
    "missing side": ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}]},
                     "record 0: field rejected: missing"),
    "empty answer": ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": " "}],
                      "rejected": [{"role": "assistant", "content": "b"}]}, "record 0: field chosen[0].content: empty"),
    "identical answers": ({"prompt": "q", "chosen": "same answer", "rejected": "same answer "},
                          "record 0: field rejected: identical to chosen"),
    "prompt ends with the assistant": (
        {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         "chosen": [{"role": "assistant", "content": "b"}], "rejected": [{"role": "assistant", "content": "c"}]},
        "record 0: field prompt: no user message to answer (the last message must be from the user)"),
    "sharegpt ends with gpt": ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                                "chosen": {"from": "gpt", "value": "b"}, "rejected": {"from": "gpt", "value": "c"}},
                               "record 0: field conversations: no user message to answer"),
    "answer from the user": ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "b"}],
                              "rejected": [{"role": "assistant", "content": "c"}]},
                             "record 0: field chosen[0].role: expected an assistant answer, got role 'user'"),
    "alpaca without rejected": ({"instruction": "q", "input": "", "chosen": "b"}, "record 0: field rejected: missing"),
}
GOOD = {"conversations": {"conversations": [{"from": "human", "value": "ok"}], "chosen": {"from": "gpt", "value": "fine"},
                          "rejected": {"from": "gpt", "value": "no"}},
        "instruction": {"instruction": "ok", "chosen": "fine", "rejected": "no"},
        "prompt": {"prompt": [{"role": "user", "content": "ok"}], "chosen": [{"role": "assistant", "content": "fine"}],
                   "rejected": [{"role": "assistant", "content": "no"}]}}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_pairs_one_line_exit_2_or_skipped(tmp_path, monkeypatch, tiny_model_dir, capsys, case):
    record, message = BROKEN[case]
    good = next(g for key, g in GOOD.items() if key in record)
    if isinstance(record.get("prompt"), str):
        good = {"prompt": "ok", "chosen": "fine", "rejected": "no"}
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([record, good]), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    recipe = pair_recipe(tmp_path, tiny_model_dir, path)
    assert run(recipe, "--dry-run") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: {message}") and err.count("\n") == 1 and "Traceback" not in err
    assert run(recipe, "--dry-run", "data.on_bad_record=skip") == 0
    out = capsys.readouterr()
    assert f"skipped 1 broken record(s); first: {path}: {message}" in out.err
    assert re.search(r"\n  pairs +1\n", out.out) and re.search(r"\n  skipped +1\n", out.out)  # counted in the stats


def test_a_file_without_pairs_is_named(tmp_path, monkeypatch, tiny_model_dir, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = pair_recipe(tmp_path, tiny_model_dir, ROOT / "data" / "psych_sample.json")
    assert run(recipe, "--dry-run") == 2
    assert "psych_sample.json: no preference pairs" in capsys.readouterr().err


# ---------------------------------------------------------------- encoding: token for token


def trl_rows(model_dir, tokenizer, records: list[dict], tmp_path) -> list[dict]:
    """What plain TRL's DPOTrainer makes of conversational records (its own chat-template tokenization)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / "trl"), max_length=None, report_to="none", use_cpu=True, bf16=False)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(records))
    return [{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in trainer.train_dataset]


def conversational(path) -> list[dict]:
    """A pair file in TRL's explicit conversational form (the shipped files are already)."""
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in json.loads(Path(path).read_text("utf-8"))]


def test_tokenizer_template_rows_are_trls_chat_template_rows(tmp_path, tiny_model_dir, tokenizer):
    from common.pairs import read_conversational

    records = conversational(ROOT / "data" / "psych_pairs.json")[:12] + [
        json.loads(line) for line in (FIXTURES / "pairs_conversational.jsonl").read_text().splitlines()[:2]]
    pairs = [read_conversational(r) for r in records]
    ours = [encode_pair(tokenizer, get_template("tokenizer"), p) for p in pairs]
    theirs = trl_rows(tiny_model_dir, tokenizer, records, tmp_path)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    for mine, trl in zip(ours, theirs, strict=True):
        assert mine["prompt_ids"] == trl["prompt_ids"]
        # TRL's completion runs to the end of the rendering: the answer, <|im_end|> and the newline after it, which SFT
        # leaves untrained (the separator); ours is what SFT labels.
        for side in ("chosen_ids", "rejected_ids"):
            assert trl[side] == mine[side] + newline
    # Without a separator after the end-of-turn token, the rows are the same rows.
    no_sep = tokenizer.__class__.from_pretrained(tiny_model_dir)
    no_sep.chat_template = CHATML_NO_SEP
    assert [encode_pair(no_sep, get_template("tokenizer"), p) for p in pairs] == trl_rows(tiny_model_dir, no_sep, records,
                                                                                          tmp_path)


def test_smollm2_dump_is_trls_tokenization(tmp_path, monkeypatch, tiny_model_dir):
    """The dump of the shipped pair set with SmolLM2's own template is TRL's tokenization token for token (less the
    newline after each answer's <|im_end|>, which neither SFT nor we score)."""
    from common.modeling import load_tokenizer

    if not SMOLLM2.is_dir():
        pytest.skip("SmolLM2 not downloaded (make demo-model)")
    monkeypatch.chdir(tmp_path)
    recipe = pair_recipe(tmp_path, SMOLLM2, ROOT / "data" / "psych_pairs_heldout.json", data={"max_length": 512})
    assert run(recipe, "--dump-dataset", tmp_path / "dump.jsonl") == 0
    dumped = [json.loads(line) for line in (tmp_path / "dump.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(SMOLLM2)
    theirs = trl_rows(tiny_model_dir, tokenizer, conversational(ROOT / "data" / "psych_pairs_heldout.json"), tmp_path)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert len(dumped) == len(theirs) == 16
    for mine, trl in zip(dumped, theirs):
        assert mine == {"prompt_ids": trl["prompt_ids"], "chosen_ids": trl["chosen_ids"][:-1],
                        "rejected_ids": trl["rejected_ids"][:-1]}
        assert trl["chosen_ids"][-1:] == trl["rejected_ids"][-1:] == newline


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_xtuner_templates_score_what_sft_trains(tokenizer, name):
    """For every XTuner template: the prompt is SFT's encoding up to the final answer, each answer is exactly the
    tokens SFT labels for it (answer + SUFFIX/EOS), whatever SFT labelled before is context."""
    template = get_template(name)
    pair = load_pairs([FIXTURES / "pairs_llamafactory_alpaca.json"])[1]  # a system prompt and an earlier turn
    row = encode_pair(tokenizer, template, pair)
    for side in ("chosen", "rejected"):
        *context, last = pair.prompt
        sft = template.encode(tokenizer, context + [Turn(last.input, getattr(pair, side), last.system)])
        ids = [i for seg, _ in sft[:-1] for i in seg]
        last_ids, last_labels = sft[-1]
        first = next(n for n, label in enumerate(last_labels) if label != IGNORE)
        assert row["prompt_ids"] == ids + last_ids[:first]
        assert row[f"{side}_ids"] == [label for label in last_labels if label != IGNORE]
        assert row[f"{side}_ids"] == last_ids[first:first + len(row[f"{side}_ids"])]  # contiguous


def test_long_pairs_lose_prompt_turns_from_the_left_then_tokens(tokenizer):
    template = get_template("tokenizer")
    turns = [Turn(f"第{i}个问题，我最近睡得不好。", f"第{i}个回答，先说说你的睡眠。") for i in range(6)]
    pair = Pair([Turn(turns[0].input, turns[0].output, "系统提示")] + turns[1:] + [Turn("最后的问题", None)],
                "谢谢你愿意说出来。", "别想太多。")
    full = encode_pair(tokenizer, template, pair)
    answer = max(len(full["chosen_ids"]), len(full["rejected_ids"]))
    stats = encode_pairs([pair], tokenizer, template, len(full["prompt_ids"]) + answer - 1)[1]
    assert (stats.pairs, stats.shortened, stats.turns_dropped, stats.prompt_tokens_cut) == (1, 1, 1, 0)
    rows, _ = encode_pairs([pair], tokenizer, template, len(full["prompt_ids"]) + answer - 1)
    text = tokenizer.decode(rows[0]["prompt_ids"])
    assert "系统提示" in text and "第0个问题" not in text and "第1个问题" in text  # the system prompt moved on
    assert rows[0]["chosen_ids"] == full["chosen_ids"] and rows[0]["rejected_ids"] == full["rejected_ids"]
    # only the last user turn left, still too long: its tokens go from the left, the answers stay whole
    rows, stats = encode_pairs([pair], tokenizer, template, answer + 3)
    assert stats.turns_dropped == 6 and stats.prompt_tokens_cut > 0 and len(rows[0]["prompt_ids"]) == 3
    assert rows[0]["chosen_ids"] == full["chosen_ids"]
    # an answer that alone does not fit: the pair is dropped and counted
    rows, stats = encode_pairs([pair], tokenizer, template, answer)
    assert rows == [] and stats.dropped == 1


# ---------------------------------------------------------------- recipes


@pytest.mark.parametrize("overrides, message", [
    (["preference.betta=0.2"], "unknown key `preference.betta` (did you mean `preference.beta`?)"),
    (["preference.loss_type=kto"], "`preference.loss_type`: got 'kto', expected sigmoid | hinge | ipo"),
    (["train.method=orpo", "preference.beta=0.5"], "`preference.beta` applies to train.method dpo, not orpo"),
    (["preference.orpo_lambda=0.5"], "`preference.orpo_lambda` applies to train.method orpo, not dpo"),
    (["train.method=sft", "data.pack=false", "preference.beta=0.5"], "applies to train.method dpo, not sft"),
    (["data.pack=true"], "`data.pack`: train.method dpo trains on pairs, which are not packed"),
    (["preference.loss_type=exo_pair"], "loss_type exo_pair needs 0 < x < 0.5"),
    (["model.adapter=/no/adapter"], "`model.adapter`: /no/adapter holds no adapter_config.json"),
    (["lora=null", "model.adapter=/no/adapter"], "cannot be combined with `lora: null`"),
])
def test_preference_recipe_problems(tmp_path, tiny_model_dir, pairs_file, overrides, message):
    from common.methods.table import load_recipe

    with pytest.raises(UserError) as e:
        load_recipe(pair_recipe(tmp_path, tiny_model_dir, pairs_file), overrides)
    assert message in str(e.value)


def test_dry_run_marks_the_scored_spans(tmp_path, monkeypatch, tiny_model_dir, pairs_file, capsys):
    monkeypatch.chdir(tmp_path)
    assert run(pair_recipe(tmp_path, tiny_model_dir, pairs_file), "--dry-run") == 0
    out = capsys.readouterr().out
    first = json.loads(pairs_file.read_text("utf-8"))[0]
    assert "method dpo, template tokenizer" in out and "  pairs  " in out
    assert f"[[{first['chosen'][0]['content']}<|im_end|>]]" in out
    assert f"[[{first['rejected'][0]['content']}<|im_end|>]]" in out


# ---------------------------------------------------------------- training through train.py


def test_dpo_run_writes_the_run_dir_and_resumes_exactly(tmp_path, monkeypatch, tiny_model_dir, pairs_file):
    monkeypatch.chdir(tmp_path)
    whole = pair_recipe(tmp_path, tiny_model_dir, pairs_file, name="whole", data={"eval_fraction": 0.2})
    assert run(whole) == 0
    out = tmp_path / "whole"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert {"adapter_model.safetensors", "adapter_config.json", "recipe.yaml", "optimizer.pt",
            "trainer_state.json"} <= {p.name for p in (out / "checkpoint-4").iterdir()}
    final = {p.name for p in (out / "final").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "recipe.yaml"} <= final
    assert "ref" not in final  # a fresh adapter's reference is the adapter switched off: no copy of it
    rows = metrics(out)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "tokens_per_s"} <= set(steps[0])
    # policy == reference at the first step: DPO's loss is log 2 and the rewards are zero
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and steps[0]["rewards/margins"] == 0
    assert steps[-1]["rewards/margins"] > 0  # a high learning rate on ten pairs: the margin grows
    assert any("eval_rewards/margins" in r and "eval_loss" in r for r in rows)
    assert (out / "loss.png").is_file() and list((out / "runs").rglob("events.out.tfevents.*"))
    assert (out / "eval_outputs" / "step_4.txt").is_file()
    log = (out / "train.log").read_text(encoding="utf-8")
    assert "method: dpo" in log and "reference: the model before training: the adapter switched off" in log
    assert "margin " in log and "reward acc " in log

    resumed = pair_recipe(tmp_path, tiny_model_dir, pairs_file, name="resumed", data={"eval_fraction": 0.2})
    with pytest.raises(Killed):  # killed after checkpoint-2 is complete
        train.main([str(resumed)], extra_callbacks=[KillAt(2)])
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*")) == ["checkpoint-2"]
    assert run(resumed, "--resume", "auto") == 0
    assert "resuming from" in (tmp_path / "resumed" / "train.log").read_text()
    expected, got = adapter_tensors(out / "final"), adapter_tensors(tmp_path / "resumed" / "final")
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6, rtol=0), name


def test_orpo_run(tmp_path, monkeypatch, tiny_model_dir, pairs_file):
    monkeypatch.chdir(tmp_path)
    assert run(pair_recipe(tmp_path, tiny_model_dir, pairs_file, train={"method": "orpo", "max_steps": 2})) == 0
    out = tmp_path / "recipe"
    steps = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert {"nll_loss", "log_odds_ratio", "rewards/chosen", "rewards/margins"} <= set(steps[0])
    # ORPO's loss: the chosen answer's NLL (over prompt and answer, as TRL computes it) minus lambda * log sigmoid(log odds)
    assert steps[0]["loss"] == pytest.approx(steps[0]["nll_loss"] - 0.1 * steps[0]["log_odds_ratio"], rel=1e-5)
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert "preference: ORPO, lambda 0.1; reference: none" in (out / "train.log").read_text(encoding="utf-8")


def test_a_continued_adapter_is_its_own_reference(tmp_path, monkeypatch, tiny_model_dir, pairs_file):
    """DPO from an SFT run's adapter: the reference is that adapter (TRL's frozen copy), not the base, so the first
    step's rewards are zero; the adapter trains on from its SFT weights."""
    monkeypatch.chdir(tmp_path)
    sft = write_recipe(tmp_path, tiny_model_dir, ROOT / "data" / "psych_sample.json", name="sft",
                       data={"template": "tokenizer"}, train={"max_steps": 2, "lr": 5e-2})
    assert run(sft) == 0
    adapter = tmp_path / "sft" / "final"
    recipe = pair_recipe(tmp_path, tiny_model_dir, pairs_file, model={"adapter": str(adapter)},
                         train={"max_steps": 2})
    assert run(recipe) == 0
    steps = [r for r in metrics(tmp_path / "recipe") if "loss" in r]
    assert steps[0]["rewards/chosen"] == 0 and steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # the base alone would score the answers differently from the SFT adapter: the reference is not the base
    with_off = pair_recipe(tmp_path, tiny_model_dir, pairs_file, name="fresh", train={"max_steps": 1})
    assert run(with_off) == 0
    fresh = [r for r in metrics(tmp_path / "fresh") if "loss" in r][0]
    assert fresh["logps/chosen"] != pytest.approx(steps[0]["logps/chosen"])
    start, end = adapter_tensors(adapter), adapter_tensors(tmp_path / "recipe" / "final")
    assert start.keys() == end.keys() and any(not torch.equal(start[k], end[k]) for k in start)
    assert "LoRA continuing the adapter" in (tmp_path / "recipe" / "train.log").read_text(encoding="utf-8")


def test_full_finetune_dpo_keeps_a_frozen_reference(tmp_path, monkeypatch, tiny_model_dir, pairs_file):
    monkeypatch.chdir(tmp_path)
    assert run(pair_recipe(tmp_path, tiny_model_dir, pairs_file, lora=None, train={"max_steps": 2})) == 0
    out = tmp_path / "recipe"
    steps = [r for r in metrics(out) if "loss" in r]
    assert steps[0]["rewards/margins"] == 0 and steps[1]["rewards/margins"] != 0
    assert (out / "final" / "config.json").is_file() and not (out / "final" / "adapter_config.json").exists()
    assert "a frozen copy of model.path" in (out / "train.log").read_text(encoding="utf-8")


# ---------------------------------------------------------------- the loss: ours against plain TRL


def chatml_model(tmp_path, tiny_model_dir):
    """(directory, tokenizer) of the tiny model with a separator-free ChatML: TRL's tokenization of a record is then
    token for token ours (template `tokenizer`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tmp_path / "model"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = CHATML_NO_SEP
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir, tok


def plain_trl_steps(trainer_class, config_class, model_dir, tok, records: list[dict], out, steps: int,
                    lr: float) -> list[dict]:
    """A plain TRL trainer on the records in float32, LoRA r=4 on all linear layers, batch 2, cosine without warmup
    (what the comparing recipes set): its logged steps."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    args = config_class(output_dir=str(out), max_steps=steps, learning_rate=lr, per_device_train_batch_size=2,
                        lr_scheduler_type="cosine", warmup_steps=0, logging_steps=1, report_to="none", use_cpu=True,
                        bf16=False, gradient_checkpointing=False, max_length=None, save_strategy="no", seed=42,
                        optim="adamw_torch")
    torch.manual_seed(0)
    plain = trainer_class(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, processing_class=tok,
                          train_dataset=Dataset.from_list(records),
                          peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    plain.train()
    return [h for h in plain.state.log_history if "loss" in h]


@pytest.mark.parametrize("fast_paths", [False, True])
def test_loss_and_rewards_equal_plain_trl_dpo(tmp_path, monkeypatch, tiny_model_dir, pairs_file, fast_paths):
    """The same rows (TRL's own tokenization equals ours with a separator-free ChatML), float32: plain DPOTrainer on
    conversational records and train.py agree on every step's loss, rewards and log-probs."""
    from trl import DPOConfig, DPOTrainer

    monkeypatch.chdir(tmp_path)
    model_dir, tok = chatml_model(tmp_path, tiny_model_dir)
    steps, lr = 3, 2e-2
    recipe = pair_recipe(tmp_path, model_dir, pairs_file, lora={"r": 4, "alpha": 8, "dropout": 0.0},
                         data={"max_length": 1024},  # nothing shortened: TRL's rows are whole too
                         train={"max_steps": steps, "lr": lr, "batch_size": 2, "fast_paths": fast_paths,
                                "warmup_ratio": 0.0, "save_steps": 100}, evaluation={"prompts": []})
    assert run(recipe) == 0
    ours = [r for r in metrics(tmp_path / "recipe") if "loss" in r]

    theirs = plain_trl_steps(DPOTrainer, DPOConfig, model_dir, tok, conversational(pairs_file), tmp_path / "plain",
                             steps, lr)
    paths = "fast paths: packed_attention, fused_lora, packed_pairs" if fast_paths else "fast paths: none"
    assert paths in (tmp_path / "recipe" / "train.log").read_text(encoding="utf-8")
    assert len(theirs) == len(ours) == steps
    for mine, trl in zip(ours, theirs):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert mine[key] == pytest.approx(trl[key], abs=1e-4), (mine["step"], key)
        for key in ("logps/chosen", "logps/rejected"):
            assert mine[key] == pytest.approx(trl[key], rel=1e-5), (mine["step"], key)
    assert ours[-1]["loss"] < math.log(2) - 1e-3  # the later steps compare trained weights, not the starting point


def test_packed_pairs_give_the_padded_batch_outputs_and_gradients(tiny_model_dir, tokenizer):
    """DPO's padded batch through one packed row (each prompt once, the rejected answer a branch of it): the fused
    head's per-token outputs and the gradients equal the padded forward's; a batch of another shape goes through as
    it is."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head

    from common import acceleration

    pairs = load_pairs([FIXTURES / "pairs_conversational.jsonl", FIXTURES / "pairs_llamafactory_alpaca.json"])
    rows = [encode_pair(tokenizer, get_template("tokenizer"), p) for p in pairs]
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(rows)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE)
    assert (batch["attention_mask"] == 0).any()  # padded: the packed row drops that

    def outputs_and_grads(packed: bool):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir,
                                                     attn_implementation=acceleration.register_packed_attention())
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
        if packed:
            acceleration.pack_pairs(model.get_base_model())
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    use_cache=False, fused_lm_head=True)
        (out.log_probs.sum(dim=1) * torch.arange(1.0, 1 + len(labels))).sum().backward()  # each row weighs apart
        return out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    assert acceleration._pair_layout(batch["input_ids"], batch["attention_mask"], labels) is not None
    (padded, padded_grads), (packed, packed_grads) = outputs_and_grads(False), outputs_and_grads(True)
    torch.testing.assert_close(packed.log_probs, padded.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.entropy, padded.entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.mean_logits, padded.mean_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.is_top1, padded.is_top1) and padded.log_probs.abs().sum() > 0
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m: name + m)
    # not a DPO batch (an odd number of rows, or chosen and rejected prompts that differ): nothing is packed
    assert acceleration._pair_layout(batch["input_ids"][:3], batch["attention_mask"][:3], labels[:3]) is None
    half = len(labels) // 2
    order = list(range(half)) + list(reversed(range(half, 2 * half)))  # rejected answers of other prompts
    assert acceleration._pair_layout(batch["input_ids"][order], batch["attention_mask"][order], labels[order]) is None


# ---------------------------------------------------------------- eval.py: preference accuracy


def test_answer_log_probs_are_the_models(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from common.methods.pairwise import answer_logps, preference_accuracy

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    pairs = load_pairs([FIXTURES / "pairs_llamafactory_alpaca.json"])
    rows = [encode_pair(tokenizer, get_template("tokenizer"), p) for p in pairs]
    expected = []
    for row in rows:
        logps = []
        for side in ("chosen_ids", "rejected_ids"):
            ids = torch.tensor([row["prompt_ids"] + row[side]])
            with torch.no_grad():
                logits = model(ids).logits.float().log_softmax(-1)[0]
            n = len(row["prompt_ids"])
            logps.append(sum(logits[n - 1 + k, t].item() for k, t in enumerate(row[side])))
        assert answer_logps(model, row)[0] == pytest.approx(logps, abs=1e-3)
        assert answer_logps(model, row)[1] == [len(row["chosen_ids"]), len(row["rejected_ids"])]
        expected.append(logps[0] - logps[1])
    result = preference_accuracy(model, rows)
    assert result["margins"] == pytest.approx(expected, abs=1e-3)
    assert result["accuracy"] == sum(m > 0 for m in expected) / len(expected)


def evaluated(run_dir: Path, capsys) -> dict:
    """eval.py on the run (one answer of 4 tokens): its report.json."""
    import eval as eval_script

    try:
        assert eval_script.main([str(run_dir), "--limit", "1", "--max-new-tokens", "4"]) == 0
    except SystemExit as e:
        raise AssertionError(capsys.readouterr().err) from e
    return json.loads((run_dir / "eval" / "report.json").read_text(encoding="utf-8"))


def test_eval_reports_preference_accuracy_base_vs_tuned(tmp_path, monkeypatch, tiny_model_dir, pairs_file, capsys):
    monkeypatch.chdir(tmp_path)
    assert run(pair_recipe(tmp_path, tiny_model_dir, pairs_file, data={"eval_path": str(pairs_file)},
                           evaluation={"prompts": []})) == 0
    report = evaluated(tmp_path / "recipe", capsys)
    pref = report["preference"]
    assert pref["base"]["pairs"] == pref["tuned"]["pairs"] == 10 and len(pref["tuned"]["margins"]) == 10
    # trained on these very pairs with a high learning rate: the tuned margins grew
    assert pref["tuned"]["mean_margin"] > pref["base"]["mean_margin"] and pref["margin_grew"] > 0.5
    assert report["conversations"] == 10  # the held-out loss is that of the chosen answers
    assert "preference accuracy (margin > 0)" in (tmp_path / "recipe" / "eval" / "report.md").read_text(encoding="utf-8")
    assert "preference accuracy on 10 held-out pairs" in capsys.readouterr().out
