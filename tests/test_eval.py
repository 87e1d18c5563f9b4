"""eval.py on a tiny random llama: the held-out loss is training's loss computation on the same rows, switching the
adapter off gives the base's exact logits, the report carries its keys, bad input is one line and exit 2."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval as eval_script  # noqa: E402
from common import artifacts, evaluation  # noqa: E402
from common.recipe import DataConfig, EvaluationConfig, ModelConfig, Recipe, save_recipe  # noqa: E402

SYSTEM = "你是一位心理咨询师。"


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    records = json.loads((ROOT / "data" / "psych_heldout.json").read_text(encoding="utf-8"))
    records += json.loads((ROOT / "data" / "psych_sample.json").read_text(encoding="utf-8"))[:6]
    path = tmp_path_factory.mktemp("held_out") / "held_out.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def make_run(root: Path, tiny_model_dir, tokenizer, held_out, seed=1, name="demo", max_length=160):
    """A run as train.py leaves it: final/ (a LoRA adapter with non-zero B + tokenizer + recipe.yaml)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = root / "work_dirs" / name
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(run / artifacts.FINAL_DIR)
    tokenizer.save_pretrained(run / artifacts.FINAL_DIR)
    recipe = Recipe(model=ModelConfig(path=str(tiny_model_dir)),
                    data=DataConfig(path="unused.json", template="qwen_chat", system=SYSTEM, max_length=max_length,
                                    eval_path=str(held_out)),
                    evaluation=EvaluationConfig(prompts=["我最近很焦虑"], max_new_tokens=6))
    for d in (run, run / artifacts.FINAL_DIR):
        save_recipe(recipe, d / artifacts.RECIPE_FILE)
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, tokenizer, held_out):
    root = tmp_path_factory.mktemp("eval_run")
    return make_run(root, tiny_model_dir, tokenizer, held_out)


def call(argv, capsys):
    try:
        code = eval_script.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_held_out_loss_is_the_training_loss_on_the_same_rows(run_dir, tiny_model_dir, tokenizer, held_out):
    from common.acceleration import apply
    from common.formats import load_conversations
    from common.modeling import load_model
    from common.samples import pack_rows
    from common.templates import get_template
    from common.training import build_trainer

    recipe = artifacts.run_recipe(run_dir)
    recipe.train.output_dir = str(run_dir / "trainer")
    samples = evaluation.held_out_samples(tokenizer, get_template("qwen_chat"), load_conversations([str(held_out)]),
                                          DataConfig(system=SYSTEM, max_length=160, truncation="split"))
    # Rows of 480 hold several samples of at most 160; each row split back into its samples, as packing made them.
    packed = pack_rows(samples, 480, shuffle=False, seed=0)
    rows = []
    for row in packed:
        starts = [sum(row["seq_lengths"][:k]) for k in range(len(row["seq_lengths"]) + 1)]
        rows.append([(row["owners"][a], row["input_ids"][a:b], row["labels"][a:b]) for a, b in zip(starts, starts[1:])])
    assert len(rows) > 3 and any(len(row) > 1 for row in rows)  # packed rows, several samples in some
    assert sorted(len(s[1]) for row in rows for s in row) == sorted(len(s["input_ids"]) for s in samples)  # none cut
    scoring_rows = evaluation.scoring_rows(samples, 480, tokenizer.pad_token_id)

    model = load_model(recipe, torch.float32)  # training's own model and Trainer, on the same rows
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    trainer = build_trainer(recipe, model, apply(model, recipe), tokenizer,
                            [{k: s[k] for k in ("input_ids", "labels")} for s in samples], None, [], torch.float32,
                            disable_tqdm=True)
    model.eval()
    scored = evaluation.score(model, scoring_rows, len(load_conversations([str(held_out)])))
    total, count = 0.0, 0
    for row, ours in zip(rows, scoring_rows, strict=True):
        batch = trainer.data_collator([{"input_ids": ids, "labels": labels} for _, ids, labels in row])
        for key in ("input_ids", "position_ids", "labels"):
            assert torch.equal(batch[key], ours[key])
        assert torch.equal(ours["owners"], torch.tensor([[owner for owner, ids, _ in row for _ in ids]]))
        with torch.no_grad():
            train_loss = trainer.compute_loss(model, dict(batch)).item()
        ce, _ = evaluation.score_row(model, ours)
        assert abs(ce.mean().item() - train_loss) < 1e-5
        total, count = total + ce.sum().item(), count + len(ce)
    assert abs(scored.loss - total / count) < 1e-9 and sum(scored.tokens) == count


def test_adapter_off_gives_the_base_exactly(run_dir, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    models = evaluation.Contestants(artifacts.resolve_model(str(run_dir), adapter_first=True), dtype="float32")
    ids = torch.tensor([list(range(5, 40))])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(input_ids=ids).logits
        with models.use("base") as m:
            off = m(input_ids=ids).logits
        with models.use("tuned") as m:
            on = m(input_ids=ids).logits
    assert torch.equal(off, base)
    assert (on - base).abs().max() > 1e-3  # the adapter changes the model


def test_report_files_carry_their_keys(run_dir, capsys):
    code, out, err = call([run_dir, "--limit", "2", "--torch-dtype", "float32"], capsys)
    assert code == 0, err
    report = json.loads((run_dir / "eval" / "report.json").read_text(encoding="utf-8"))
    for who in ("base", "tuned"):
        assert set(report[who]) >= {"loss", "ppl", "tokens"} and report[who]["tokens"] > 100
    assert report["base"]["tokens"] == report["tuned"]["tokens"] and report["base"]["loss"] != report["tuned"]["loss"]
    assert 0.0 <= report["tuned_better_share"] <= 1.0 and report["conversations"] == 12
    assert len(report["answers"]) == 3  # the run's evaluation prompt and 2 held-out first turns
    for a in report["answers"]:
        assert {"prompt", "base", "tuned", "base_stop", "tuned_stop"} <= set(a)
        assert a["base_stop"] in ("eos", "stop_word", "length")
        assert set(a["tuned_facts"]) == {"tokens", "ended_by", "repeated_4gram_share", "distinct_2"}
    md = (run_dir / "eval" / "report.md").read_text(encoding="utf-8")
    assert "| loss (mean over answer tokens) |" in md and "我最近很焦虑" in md
    assert "held-out loss over" in out and "report:" in out
    code, _, err = call([run_dir], capsys)  # an existing report is not replaced without --force
    assert code == 2 and "--force" in err


def test_compare_with_another_adapter_of_the_same_base(tmp_path, run_dir, tiny_model_dir, tokenizer, held_out, capsys):
    other = make_run(tmp_path, tiny_model_dir, tokenizer, held_out, seed=2, name="other")
    code, out, err = call([run_dir, "--compare", other, "--limit", "0", "--out", tmp_path / "cmp"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "cmp" / "report.json").read_text(encoding="utf-8"))
    assert str(other / "final") in report["base_name"] and report["base"]["loss"] != report["tuned"]["loss"]
    models = evaluation.Contestants(artifacts.resolve_model(str(run_dir), adapter_first=True),
                                    artifacts.resolve_model(str(other), adapter_first=True), "float32")
    assert models.other_model is None and models.other_adapter  # one model load, two adapters


def test_answer_facts_measure_repetition():
    from common.generation import Completion

    facts = evaluation.answer_facts(Completion("你可以看看我的看法。" * 3, 10, 30, "length"))
    assert facts["repeated_4gram_share"] > 0.5 and facts["distinct_2"] < 0.5 and facts["ended_by"] == "length"
    fresh = evaluation.answer_facts(Completion("Try to keep a regular wake-up time, even on weekends.", 10, 12, "eos"))
    assert fresh["repeated_4gram_share"] == 0.0 and fresh["distinct_2"] == 1.0


def test_bad_input_is_one_line_and_exit_2(tmp_path, run_dir, tiny_model_dir, tokenizer, capsys):
    cases = []
    code, _, err = call([tiny_model_dir, "--data", ROOT / "data" / "psych_heldout.json", "--out", tmp_path / "a"], capsys)
    cases.append((code, err, "full model without an adapter"))
    code, _, err = call([run_dir, "--data", tmp_path / "missing.json", "--out", tmp_path / "b"], capsys)
    cases.append((code, err, "missing.json: data file not found"))
    (tmp_path / "broken.json").write_text('[{"conversation": [{"input": "a"}]}]', encoding="utf-8")
    code, _, err = call([run_dir, "--data", tmp_path / "broken.json", "--out", tmp_path / "c"], capsys)
    cases.append((code, err, "record 0: field conversation[0].output: missing"))
    # A model whose tokenizer has no chat template, evaluated with template `tokenizer`: it cannot be rendered.
    plain = tmp_path / "plain"
    run = make_run(tmp_path, tiny_model_dir, tokenizer, ROOT / "data" / "psych_heldout.json", name="plain")
    recipe = artifacts.run_recipe(run)
    recipe.data.template = "tokenizer"
    save_recipe(recipe, run / artifacts.RECIPE_FILE)
    save_recipe(recipe, run / artifacts.FINAL_DIR / artifacts.RECIPE_FILE)
    config = json.loads((run / "final" / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (run / "final" / "tokenizer_config.json").write_text(json.dumps(config))
    for jinja in (run / "final").glob("chat_template.jinja"):
        jinja.unlink()
    code, _, err = call([run, "--out", plain], capsys)
    cases.append((code, err, "needs a tokenizer with a chat_template"))
    for code, err, message in cases:
        assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
