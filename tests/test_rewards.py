"""The reward catalog (common/rewards.py) on real replies: Chinese and English, the demo's loops, answers cut at the
length limit, crisis messages; and `rewards:` in the recipe, each bad entry one line before any model loads."""
import json
import textwrap
from pathlib import Path

import pytest

from common.cli import UserError
from common.modeling import load_tokenizer
from common.methods.table import load_recipe
from common.rewards import RewardEntry, Ending, Language, Length, Referral, Repetition, reward_functions, mean_scores
from common.templates import get_template

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
ZH = [{"role": "system", "content": "你是一位温暖、专业的心理咨询师。"}, {"role": "user", "content": "我最近总是睡不着。"}]
EN = [{"role": "user", "content": "I can't sleep and I keep worrying."}]
CRISIS_ZH = [{"role": "user", "content": "我觉得活着没意思，不想活了。"}]
CRISIS_EN = [{"role": "user", "content": "Sometimes I want to kill myself."}]
# What the demo's SFT model answered (issue 35): a loop
LOOP_ZH = "睡不着，睡不着，睡不着，睡不着，睡不着，睡不着，睡不着，睡不着"
GOOD_ZH = "睡不着的夜晚一定很难熬。你愿意说说，最近睡前脑子里最常想到的是什么吗？"
LOOP_EN = "I understand. I understand. I understand. I understand. I understand. I understand."
GOOD_EN = "That sounds exhausting. What usually goes through your mind when you lie awake?"
REFER_ZH = "听到你这么说我很担心你。请马上拨打心理援助热线 400-161-9995，或者告诉一个你信任的人。"
REFER_EN = "I'm really worried about you. Please call or text 988 now, or go to the nearest emergency room."


def scores(settings, prompts, texts, ids=None):
    (fn,) = reward_functions([RewardEntry(type(settings).__name__.lower(), settings)], None, None)
    return fn(prompts, texts, completion_ids=ids or [[1] * 5 for _ in texts])


def test_repetition_scores_loops_low_and_varied_replies_high():
    r = scores(Repetition(n=4), [ZH, ZH, EN, EN], [LOOP_ZH, GOOD_ZH, LOOP_EN, GOOD_EN])
    assert r[0] < 0.3 and r[1] == 1.0 and r[2] < 0.3 and r[3] == 1.0
    # conversational completions (TRL's shape) read the same as strings
    assert scores(Repetition(n=4), [ZH], [[{"role": "assistant", "content": LOOP_ZH}]]) == r[:1]


def test_length_band_in_characters_and_tokens():
    r = scores(Length(min=20, max=40), [ZH] * 3, ["好的。", GOOD_ZH[:30], "很" * 60])
    assert r == [pytest.approx(3 / 20), 1.0, pytest.approx(0.5)]  # 3 characters of 20
    tokens = scores(Length(min=4, max=8, unit="tokens"), [EN, EN], ["x", "y"], ids=[[1, 2], [1] * 6])
    assert tokens == [0.5, 1.0]


def test_language_follows_the_clients_script():
    r = scores(Language(), [ZH, ZH, EN, EN, [{"role": "user", "content": "？？"}]],
               [GOOD_ZH, GOOD_EN, GOOD_EN, GOOD_ZH, "hello"])
    assert r[0] == 1.0 and r[1] == 0.0 and r[2] == 1.0 and r[3] == 0.0 and r[4] is None
    mixed = scores(Language(), [ZH], ["我理解你的感受，sleep hygiene 很重要。"])[0]
    assert 0.4 < mixed < 1.0


def test_referral_only_on_crisis_prompts():
    words = Referral()
    words.prepare()  # the shipped word lists load
    r = scores(words, [CRISIS_ZH, CRISIS_ZH, CRISIS_EN, CRISIS_EN, ZH, EN],
               [REFER_ZH, GOOD_ZH, REFER_EN, GOOD_EN, GOOD_ZH, REFER_EN])
    assert r == [1.0, 0.0, 1.0, 0.0, None, None]


@pytest.mark.skipif(not (DEMO_MODEL / "tokenizer.json").is_file(), reason="make demo-model")
def test_ending_needs_the_templates_end_of_turn():
    """SmolLM2's own template ends a turn with <|im_end|> (its EOS); a reply cut at the limit has none."""
    tokenizer = load_tokenizer(str(DEMO_MODEL))
    (fn,) = reward_functions([RewardEntry("ending", Ending())], tokenizer, get_template("tokenizer"))
    ended = tokenizer.encode(GOOD_EN, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    cut = tokenizer.encode(LOOP_EN, add_special_tokens=False)[:12]
    assert fn([EN, EN], [GOOD_EN, LOOP_EN], completion_ids=[ended, cut]) == [1.0, 0.0]
    # chatml written as text by a table template: the stop word ends it too
    (fn,) = reward_functions([RewardEntry("ending", Ending())], tokenizer, get_template("qwen_chat"))
    as_text = tokenizer.encode(GOOD_EN + "<|im_end|>", add_special_tokens=False)
    assert fn([EN], [GOOD_EN], completion_ids=[as_text]) == [1.0]


def test_python_reward_and_names_and_means(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def polite(prompts, completions, **kwargs):\n"
                                            "    return [1.0 if 'please' in c else 0.0 for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(write(tmp_path, RECIPE + "  - python: my_rewards:polite\n  - length: {min: 1, max: 5}\n"
                               "    weight: 0.5\n  - length: {min: 5, max: 50}\n"))
    fns = reward_functions(recipe.rewards, None, None)
    assert [f.__name__ for f in fns] == ["repetition", "python", "length", "length_2"]
    assert [e.weight for e in recipe.rewards] == [1.0, 1.0, 0.5, 1.0]
    means = mean_scores(fns, [EN, EN], ["please sit", "no"], [[1], [1]])
    # 10 and 2 characters: (0 + 1) / 2 in the band 1..5, (1 + 2/5) / 2 in 5..50
    assert means == {"repetition": 1.0, "python": 0.5, "length": 0.5, "length_2": 0.7}


RECIPE = textwrap.dedent("""\
    model: {path: .}
    data: {path: data/psych_sample.json, pack: false}
    train: {method: grpo, batch_size: 4}
    rewards:
      - repetition: {n: 4}
""")


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_saved_rewards_load_again(tmp_path):
    from common.recipe import save_recipe

    recipe = load_recipe(write(tmp_path, RECIPE + "  - referral: {}\n    weight: 2\n  - python: json:dumps\n"))
    save_recipe(recipe, tmp_path / "saved.yaml")
    again = load_recipe(tmp_path / "saved.yaml")
    assert [e.to_dict() for e in again.rewards] == [e.to_dict() for e in recipe.rewards]
    assert again.rewards[2].to_dict() == {"python": "json:dumps", "weight": 1.0}


def test_bad_reward_entries_one_line_each(tmp_path):
    (tmp_path / "bad_words.json").write_text(json.dumps({"crisis": {"zh": "自杀"}}))
    text = RECIPE + textwrap.indent(textwrap.dedent(f"""\
          - repetiton: {{}}
          - length: {{min: 10, max: 5, units: chars}}
          - referral: {{words: {tmp_path}/missing.json}}
          - referral: {{words: {tmp_path}/bad_words.json}}
          - python: no_such_module_here:f
          - python: json
          - judge: {{url: "ftp://x"}}
          - judge: {{url: "http://127.0.0.1:9/v1", rubric: {tmp_path}/missing.json}}
          - {{repetition: {{}}, language: {{}}}}
          - ending: {{}}
            weight: heavy
    """), "  ")
    with pytest.raises(UserError) as e:
        load_recipe(write(tmp_path, text))
    lines = str(e.value).splitlines()[1:]
    expected = ["`rewards[1]`: unknown reward `repetiton` (did you mean `repetition`?)",
                "unknown key `rewards[2].length.units` (did you mean `rewards[2].length.unit`?)",
                "`rewards[10].weight`: got 'heavy', expected a number",
                "`rewards[9]`: expected one reward",
                "`rewards[2].length`: min 10 / max 5", "`rewards[3].referral`: ", "missing.json: file not found",
                "`rewards[4].referral`: ", "bad_words.json: `crisis` should map each language to a list of words",
                "`rewards[5].python`: `no_such_module_here:f`: cannot import (ModuleNotFoundError",
                "`rewards[6].python`: `json`: expected module:function",
                "`rewards[7].judge`: judge url 'ftp://x': expected an OpenAI-compatible base URL",
                f"`rewards[8].judge`: {tmp_path}/missing.json: file not found"]
    for text in expected:
        assert sum(text in line for line in lines) >= 1, (text, lines)
    assert len(lines) == 11, lines
    assert all(line.startswith("  - ") for line in lines)


def test_rewards_belong_to_grpo(tmp_path):
    with pytest.raises(UserError) as e:
        load_recipe(write(tmp_path, RECIPE.replace("method: grpo", "method: sft")), ["grpo.num_generations=8"])
    assert "`rewards` apply to train.method grpo, not sft" in str(e.value)
    assert "`grpo.num_generations` applies to train.method grpo, not sft" in str(e.value)
    with pytest.raises(UserError) as e:
        load_recipe(write(tmp_path, RECIPE), ["train.batch_size=3", "grpo.max_completion_length=4096", "rewards=[]"])
    message = str(e.value)
    assert "must be a multiple of `grpo.num_generations` (4)" in message
    assert "leaves no room for a prompt" in message and "list at least one" in message
