"""Recipe loading: defaults as schema, overrides typed, every problem reported at once."""
import pytest

from common.cli import UserError
from common.recipe import load_recipe, save_recipe


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


BASE = """
model: {path: %s}
data: {path: data/psych_sample.json, template: qwen_chat}
"""


def test_defaults_and_output_dir(tmp_path):
    r = load_recipe(write(tmp_path, BASE % tmp_path, "my_run.yaml"))
    assert r.train.output_dir == "work_dirs/my_run"
    assert r.lora.target_modules == "all-linear" and r.data.truncation == "split"
    assert r.data.paths == ["data/psych_sample.json"]


def test_overrides_are_typed(tmp_path):
    r = load_recipe(write(tmp_path, BASE % tmp_path), ["data.max_length=1024", "train.lr=1e-4",
                                                       "train.betas=[0.9, 0.95]", "lora=null"])
    assert r.data.max_length == 1024 and r.train.lr == 1e-4 and r.train.betas == [0.9, 0.95] and r.lora is None


def test_all_problems_reported_at_once(tmp_path):
    path = write(tmp_path, BASE % tmp_path + "train: {learning_rate: 1e-4, batch_size: two}\nevals: {}\n")
    with pytest.raises(UserError) as e:
        load_recipe(path, ["data.template=qwen_chatt", "lora.lora_alpha=8"])
    message = str(e.value)
    assert "5 problems" in message
    assert "unknown key `train.learning_rate` (did you mean `train.lr`?)" in message
    assert "`train.batch_size`: got 'two', expected int" in message
    assert "unknown section `evals` (did you mean `evaluation`?)" in message
    assert "unknown template `qwen_chatt` (did you mean `qwen_chat`?)" in message


def test_missing_model_path_and_bad_choice(tmp_path):
    path = write(tmp_path, f"model: {{path: {tmp_path}/nope, dtype: float64}}\ndata: {{path: x.json}}\n")
    with pytest.raises(UserError) as e:
        load_recipe(path)
    assert f"{tmp_path}/nope does not exist" in str(e.value)
    assert "`model.dtype`: got 'float64', expected auto | float32 | float16 | bfloat16 | fp32 | fp16 | bf16" in str(e.value)


def test_truncation_choices_are_the_modes_samples_implements(tmp_path):
    with pytest.raises(UserError) as e:
        load_recipe(write(tmp_path, BASE % tmp_path), ["data.truncation=middle"])
    assert "`data.truncation`: got 'middle', expected cut | turns | split" in str(e.value)


def test_quantized_full_finetune_refused(tmp_path):
    with pytest.raises(UserError, match="quantization"):
        load_recipe(write(tmp_path, BASE % tmp_path), ["lora=null", "model.quantization=4bit"])


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="expected SECTION.KEY=VALUE"):
        load_recipe(write(tmp_path, BASE % tmp_path), ["train.lr"])
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_saved_recipe_round_trips(tmp_path):
    r = load_recipe(write(tmp_path, BASE % tmp_path), ["train.epochs=3"])
    save_recipe(r, tmp_path / "out.yaml")
    again = load_recipe(tmp_path / "out.yaml")
    assert again.train.epochs == 3 and again.data.template == "qwen_chat" and again.train.output_dir == r.train.output_dir


@pytest.mark.parametrize("name", ["psych_qwen.yaml", "psych_qwen3.yaml", "demo_smollm2.yaml"])
def test_shipped_recipes_are_valid_apart_from_model(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / name
    if not path.exists():
        pytest.fail(f"{path} missing")
    try:
        load_recipe(path)
    except UserError as e:  # the Qwen weights are not on this machine: that must be the only problem
        assert "1 problem:" in str(e) and "`model.path`" in str(e)


def test_run_recipe_read_elsewhere_needs_no_paths(tmp_path):
    path = write(tmp_path, "model: {path: models/elsewhere}\ndata: {template: qwen_chat, max_length: 300}\n")
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(path)
    r = load_recipe(path, for_training=False)  # chat/merge reading a run's recipe.yaml from another directory
    assert r.data.template == "qwen_chat" and r.data.max_length == 300
    with pytest.raises(UserError, match="unknown template"):  # everything else is still checked
        load_recipe(path, ["data.template=nope"], for_training=False)
