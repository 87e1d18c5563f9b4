"""train.method kto: rated answers in TRL's and LLaMA-Factory's layouts, the recipe checks, a run whose per-step loss
equals plain TRL KTOTrainer's on the same rows, and eval.py's rated-answer measures."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.cli import UserError  # noqa: E402
from common.unpaired import detect_rated_format, encode_rated, load_rated  # noqa: E402
from common.templates import get_template  # noqa: E402
from test_preference import chatml_model, evaluated, metrics, plain_trl_steps  # noqa: E402
from test_train import run, write_recipe  # noqa: E402

KTO = ROOT / "data" / "psych_kto.json"
HELD_OUT = ROOT / "data" / "psych_kto_heldout.json"


def kto_recipe(tmp_path, model_dir, path=KTO, name="recipe", **sections):
    base = dict(data={"path": str(path), "template": "tokenizer", "max_length": 256, "pack": False},
                train={"method": "kto", "batch_size": 2, "max_steps": 3, "save_steps": 100, "lr": 2e-2,
                       "warmup_ratio": 0.0}, evaluation={"prompts": []})
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return write_recipe(tmp_path, model_dir, path, name=name, **base)


def test_the_three_layouts_read_alike(tmp_path, tokenizer):
    """TRL's conversational and plain records and LLaMA-Factory's (messages + label, conversations + kto_tag) are
    the same rated answer, encoded token for token as SFT encodes it."""
    layouts = {
        "conversational": {"prompt": [{"role": "user", "content": "我睡不着"}],
                           "completion": [{"role": "assistant", "content": "说说发生了什么？"}], "label": True},
        "plain": {"prompt": "我睡不着", "completion": "说说发生了什么？", "label": True},
        "sharegpt": {"messages": [{"role": "user", "content": "我睡不着"},
                                  {"role": "assistant", "content": "说说发生了什么？"}], "label": True},
    }
    tagged = {"conversations": [{"from": "human", "value": "我睡不着"}, {"from": "gpt", "value": "说说发生了什么？"}],
              "kto_tag": True}
    template = get_template("qwen_chat")
    rows = []
    for name, record in [*layouts.items(), ("sharegpt", tagged)]:
        assert detect_rated_format(record) == name
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps([record], ensure_ascii=False), encoding="utf-8")
        (rated,) = load_rated([str(path)])
        rows.append(encode_rated(tokenizer, template, rated))
    assert all(row == rows[0] for row in rows) and rows[0]["label"] is True
    assert tokenizer.decode(rows[0]["completion_ids"]) == "说说发生了什么？<|im_end|>"


@pytest.mark.parametrize("record, message", [
    ({"prompt": "a", "completion": "b", "label": "yes"},
     "record 0: field label: expected true (a good answer) or false"),
    ({"prompt": "a", "completion": "", "label": True}, "record 0: field completion:"),
    ({"messages": [{"role": "user", "content": "a"}], "label": False}, "expected an assistant answer, got role 'user'"),
])
def test_broken_rated_records_are_one_line(tmp_path, record, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([record]), encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_rated([str(path)])
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["train.batch_size=1"], "`train.batch_size`: kto's KL term pairs each prompt with another answer of its batch"),
    (["kto.beta=0"], "`kto.beta`: got 0.0, expected > 0"),
    (["train.method=dpo", "kto.desirable_weight=2"], "`kto.desirable_weight` applies to train.method kto, not dpo"),
    (["preference.beta=0.5"], "`preference.beta` applies to train.method dpo, not kto"),
    (["data.pack=true"], "`data.pack`: train.method kto trains on rated answers, which are not packed"),
])
def test_kto_recipe_problems(tmp_path, tiny_model_dir, overrides, message):
    from common.methods.table import load_recipe

    with pytest.raises(UserError) as e:
        load_recipe(kto_recipe(tmp_path, tiny_model_dir), overrides)
    assert message in str(e.value)


def test_dry_run_shows_the_balance_and_both_ratings(tmp_path, monkeypatch, tiny_model_dir, capsys):
    monkeypatch.chdir(tmp_path)
    assert run(kto_recipe(tmp_path, tiny_model_dir), "--dry-run") == 0
    captured = capsys.readouterr()
    assert "good / bad                          7 / 5" in captured.out
    assert "first good answer" in captured.out and "first bad answer" in captured.out
    # 7 good to 5 bad at equal weights: 1.4, above TRL's [1, 4/3]; the warning says which weights fix it
    assert "warning: 7 good and 5 bad answers" in captured.err
    assert "kto.undesirable_weight in [1.05, 1.40]" in captured.err
    assert run(kto_recipe(tmp_path, tiny_model_dir), "kto.undesirable_weight=1.1", "--dry-run") == 0
    assert "warning" not in capsys.readouterr().err


def test_loss_equals_plain_trl_kto_and_eval_reports_rated_answers(tmp_path, monkeypatch, tiny_model_dir, capsys):
    """The same rows in the same order, float32, LoRA: train.py and plain KTOTrainer on the conversational records
    agree on every step's loss and rewards; then eval.py measures the held-out rated answers."""
    from trl import KTOConfig, KTOTrainer

    from common.methods.kto import shuffled

    monkeypatch.chdir(tmp_path)
    model_dir, tok = chatml_model(tmp_path, tiny_model_dir)
    steps, lr = 3, 2e-2
    recipe = kto_recipe(tmp_path, model_dir, lora={"r": 4, "alpha": 8, "dropout": 0.0},
                        data={"max_length": 1024, "eval_path": str(HELD_OUT)}, evaluation={"every_n_steps": 0},
                        train={"fast_paths": True})  # what KTO takes of them: the fused LoRA forward
    assert run(recipe) == 0
    ours = [r for r in metrics(tmp_path / "recipe") if "loss" in r]

    records = shuffled(json.loads(KTO.read_text(encoding="utf-8")), 42)  # the order train.py trains in
    theirs = plain_trl_steps(KTOTrainer, KTOConfig, model_dir, tok, records, tmp_path / "plain", steps, lr)
    assert len(theirs) == len(ours) == steps
    compared = set()
    for mine, trl in zip(ours, theirs):
        # a batch logs the rewards and log-probs of the ratings it holds (chosen: good, rejected: bad)
        for key in ("loss", "kl", "rewards/chosen", "rewards/rejected"):
            if key in trl:
                assert mine[key] == pytest.approx(trl[key], abs=1e-4), (mine["step"], key)
                compared.add(key)
        for key in ("logps/chosen", "logps/rejected"):
            if key in trl:
                assert mine[key] == pytest.approx(trl[key], rel=1e-5), (mine["step"], key)
    assert compared == {"loss", "kl", "rewards/chosen", "rewards/rejected"}
    assert ours[1]["kl"] > 0 and ours[1]["rewards/chosen"] != 0  # the later steps compare trained weights
    log = (tmp_path / "recipe" / "train.log").read_text(encoding="utf-8")
    assert "method: kto" in log and "7 good / 5 bad" in log and "reference: the model before training" in log
    assert "fast paths: fused_lora" in log

    report = evaluated(tmp_path / "recipe", capsys)
    kto = report["kto"]
    assert kto["examples"] == 4 and kto["good"] == kto["bad"] == 2 and len(kto["rewards"]) == 4
    assert report["conversations"] == 2  # the held-out loss is that of the good answers
    assert "rating accuracy" in (tmp_path / "recipe" / "eval" / "report.md").read_text(encoding="utf-8")
    assert "rated answers: 4 held out" in capsys.readouterr().out


def test_a_ratings_file_holds_thumbs_beside_pairs(tmp_path):
    """The web page's ratings file: Compare's pairs and Chat's thumbs, one a line. kto reads both (a pair as its
    chosen answer rated good and its rejected one bad, as TRL unpairs); dpo and orpo read the pairs, not the thumbs."""
    from common.formats import LoadReport
    from common.pairs import load_pairs

    records = [{"prompt": [{"role": "user", "content": "我睡不着"}], "chosen": [{"role": "assistant", "content": "说说看？"}],
                "rejected": [{"role": "assistant", "content": "睡吧。"}]},
               {"prompt": [{"role": "user", "content": "我很累"}],
                "completion": [{"role": "assistant", "content": "辛苦了，发生了什么？"}], "label": False}]
    path = tmp_path / "ratings.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    rated = load_rated([str(path)])
    assert [(r.completion, r.label) for r in rated] == [("说说看？", True), ("睡吧。", False), ("辛苦了，发生了什么？", False)]
    report = LoadReport()
    (pair,) = load_pairs([str(path)], report=report)
    assert pair.chosen == "说说看？" and "passed over 1 single rated answer(s)" in report.notes[0]
