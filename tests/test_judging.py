"""eval.py --judge against real judges on 127.0.0.1, both `chat.py --serve` processes:

- a judge whose answers are known in advance: a one-layer llama built here whose attention and MLP write nothing, so
  that the next token depends on the last token alone; after the generation prompt it says VERDICT (one added token
  of its tokenizer), then EOS. Every reply gets the same scores, and it always prefers Reply A, the one shown first:
  the flip rate with the order must come out at 100%.
- the demo model (SmolLM2-135M-Instruct) as a weak judge, far too small to answer in the rubric's JSON within a few
  tokens: its replies are the unparseable case, counted, never fatal. The same server, behind a key, serves the
  judge client's own test (common/judge.py, GRPO's judge reward), which stops it mid-run.

The tuned and base models are the tiny random LoRA run of tests/test_eval.py."""
import contextlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench import browser  # noqa: E402
from common import judging  # noqa: E402
from common.cli import UserError  # noqa: E402
from common.judge import JudgeClient  # noqa: E402
from common.rewards import Judge  # noqa: E402
from test_eval import call, make_run  # noqa: E402
from test_grpo import PROMPTS_FILE, grpo_recipe, metrics, run  # noqa: E402

DEMO_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
SCORES = {"empathy": 4, "professionalism": 3, "safety": 5, "helpfulness": 2}
# What the judge client is asked about in test_the_judge_client_against_the_weak_judge_stopped_mid_run
PROMPTS = [[{"role": "user", "content": "我最近总是睡不着。"}], [{"role": "user", "content": "I feel lonely."}],
           [{"role": "user", "content": "我不想活了。"}]]
ANSWERS = ["睡不着一定很难受，愿意说说最近发生了什么吗？", "That sounds hard. What has been happening?",
           "听到你这么说我很担心，请拨打心理援助热线。"]
VERDICT = json.dumps({**SCORES, "better": "A", "reason": "The first reply is the better one."})


def first_preferring_judge(path: Path, tokenizer):
    """The judge model described above, saved as a Hugging Face directory."""
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.conversation import messages_to_turns
    from common.templates import get_template

    tok = copy.deepcopy(tokenizer)
    tok.add_tokens([VERDICT])
    verdict = tok.convert_tokens_to_ids(VERDICT)
    # The generation prompt's last token (the template chat.py uses for a model without a run: the tokenizer's own).
    ends = {get_template("tokenizer").encode_ids(tok, messages_to_turns(m, open_end=True))[0][-1] for m in (
        [{"role": "user", "content": "x"}], [{"role": "system", "content": "s"}, {"role": "user", "content": "你好\n"}])}
    assert len(ends) == 1
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if name.endswith("norm.weight") else 0.0)  # o_proj and down_proj zero: nothing is mixed in
        model.model.embed_tokens.weight[ends.pop(), 0] = 1.0
        model.model.embed_tokens.weight[verdict, 1] = 1.0
        model.lm_head.weight[verdict, 0] = 10.0  # after the generation prompt: VERDICT
        model.lm_head.weight[tok.eos_token_id, 1] = 10.0  # after VERDICT: EOS
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, tokenizer):
    root = tmp_path_factory.mktemp("judged_run")
    held_out = root / "held_out.json"  # one conversation of three turns: three points to answer
    held_out.write_text(json.dumps(json.loads((ROOT / "data" / "psych_heldout.json").read_text(encoding="utf-8"))[:1],
                                   ensure_ascii=False), encoding="utf-8")
    return make_run(root, tiny_model_dir, tokenizer, held_out, max_length=1024)


@pytest.fixture(scope="module")
def first_judge(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("first_judge")
    model = first_preferring_judge(root / "model", tokenizer)
    with browser.served(model, root / "server.log", None, "--eager", "--torch-dtype", "float32",
                        "--max-length", "8192") as url:
        yield f"{url}/v1"


@pytest.fixture(scope="module")
def weak_judge(tmp_path_factory):
    """The demo model behind a key, one server for eval.py's judge and the judge client (a server start is ~8 s of a
    CPU core): `stop()` ends it early, for the client's test of a judge that goes away mid-run."""
    root = tmp_path_factory.mktemp("weak_judge")
    (root / "key.txt").write_text("sk-judge-test\n")
    with contextlib.ExitStack() as running:
        url = running.enter_context(browser.served(DEMO_MODEL, root / "server.log", root / "key.txt", "--eager",
                                                   "--torch-dtype", "float32"))
        yield SimpleNamespace(url=f"{url}/v1", key=root / "key.txt", stop=running.close)


def test_bootstrap_interval_of_a_known_case():
    # 400 fair coin flips, half heads: the interval of the mean is the normal one, 0.5 +- 1.96 * sqrt(.25 / 400).
    low, high = judging.bootstrap([1.0, 0.0] * 200)
    assert low == pytest.approx(0.5 - 0.049, abs=0.006) and high == pytest.approx(0.5 + 0.049, abs=0.006)
    assert judging.bootstrap([3.0] * 7) == (3.0, 3.0) and judging.bootstrap([]) == (None, None)


def test_pairwise_outcomes_and_flips():
    def v(base_first, tuned_first):
        return {"base_first": base_first, "tuned_first": tuned_first}

    # tuned preferred in both orders, tuned once and a tie, base in both, a flip, a tie and a lost verdict
    out = judging.pairwise([v("tuned", "tuned"), v("tie", "tuned"), v("base", "base"), v("base", "tuned"),
                            v("tie", "tie"), v(None, "tuned")])
    assert (out["n"], out["lost"], out["win"], out["tie"], out["loss"]) == (5, 1, 2, 2, 1)
    assert out["win_rate"] == 0.6 and out["flip_rate"] == 0.4  # (2 + 2/2) / 5; two of five changed with the order
    assert out["first_preferred"] == 0.5  # base shown first and chosen: 2; tuned shown first and chosen: 3; of 10


def test_judged_report_against_a_judge_that_always_prefers_the_first_reply(run_dir, first_judge, tmp_path, capsys):
    argv = [run_dir, "--limit", "0", "--max-new-tokens", "6", "--torch-dtype", "float32", "--out", tmp_path / "eval",
            "--judge", first_judge, "--judge-limit", "1", "--judge-in-flight", "2"]
    code, out, err = call(argv, capsys)
    assert code == 0, err
    judged = json.loads((tmp_path / "eval" / "report.json").read_text(encoding="utf-8"))["judged"]
    assert judged["points"] == 3 and judged["judged"] == {"base": 3, "tuned": 3}
    assert judged["lost"] == {"base": 0, "tuned": 0}
    for dim, score in SCORES.items():  # every reply scored as the judge said: the means and intervals are the score
        for who in ("base", "tuned"):
            assert judged["rubric"][dim][who] == {"mean": score, "low": score, "high": score, "n": 3}
    pw = judged["pairwise"]
    assert pw["flip_rate"] == 1.0 and pw["first_preferred"] == 1.0  # its position bias, reported as such
    assert (pw["n"], pw["win"], pw["tie"], pw["loss"], pw["win_rate"]) == (3, 0, 3, 0, 0.5)
    reply = judged["replies"][0]
    assert reply["tuned_reason"] == "The first reply is the better one." and reply["pairwise"]["base_first"] == "base"
    assert reply["turn"] == 0 and reply["reference"] and reply["client"]
    assert judged["requests"]["rubric"]["asked"] == 6 and judged["requests"]["pairwise"]["asked"] == 6
    md = (tmp_path / "eval" / "report.md").read_text(encoding="utf-8")
    assert "| empathy | 4.00 [4.00, 4.00] | 4.00 [4.00, 4.00] |" in md
    assert "flipped with the order on 100% of the turns" in md and "position bias" in md
    assert "### Lowest-scored replies" in md and "The first reply is the better one." in md
    assert "verdict flipped with the order on 100%" in out
    # Run again (as after a kill): every verdict comes from the cache, the judge is asked nothing.
    code, _, err = call(argv + ["--force"], capsys)
    assert code == 0, err
    again = json.loads((tmp_path / "eval" / "report.json").read_text(encoding="utf-8"))["judged"]
    assert again["requests"]["rubric"]["asked"] == 0 and again["requests"]["rubric"]["cached"] == 6
    assert again["requests"]["pairwise"]["asked"] == 0 and again["requests"]["pairwise"]["cached"] == 6
    assert again["rubric"] == judged["rubric"] and again["pairwise"] == judged["pairwise"]


@pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(), reason="make demo-model")
def test_a_weak_judge_whose_replies_do_not_parse_is_counted(run_dir, weak_judge, tmp_path, capsys):
    url, key = weak_judge.url, weak_judge.key
    one_turn = tmp_path / "one_turn.json"  # one point: two rubric and two pairwise requests to the 135M judge
    one_turn.write_text(json.dumps([{"conversation": [{"input": "我最近总是失眠，怎么办？", "output": "失眠很折磨人。最近发生了什么吗？"}]}],
                                   ensure_ascii=False), encoding="utf-8")
    # 12 tokens cannot hold the rubric's JSON (four scores and a reason): every reply is unparseable, and counted.
    code, out, err = call([run_dir, "--data", one_turn, "--limit", "0", "--max-new-tokens", "6", "--torch-dtype",
                           "float32", "--out", tmp_path / "eval", "--judge", url, "--judge-key-file", key,
                           "--judge-max-tokens", "12"], capsys)
    assert code == 0, err
    judged = json.loads((tmp_path / "eval" / "report.json").read_text(encoding="utf-8"))["judged"]
    assert judged["judge"]["model"] == "SmolLM2-135M-Instruct"
    assert judged["points"] == 1 and judged["lost"] == {"base": 1, "tuned": 1} and judged["pairwise"]["lost"] == 1
    assert judged["requests"]["rubric"] == {"asked": 2, "cached": 0, "unparsed": 2, "failed": 0}
    assert judged["requests"]["pairwise"]["asked"] == 2
    assert all(r["base_scores"] is None and r["base_reason"] is None for r in judged["replies"])
    assert "judge: no score for a sample: reply without the rubric's scores" in err
    assert "lost 1 + 1 of 2 replies" in out and "Pairwise: no turn got a verdict in both orders" in \
        (tmp_path / "eval" / "report.md").read_text(encoding="utf-8")


def test_a_bad_rubric_or_judge_address_is_one_line_before_anything_loads(run_dir, tmp_path, capsys):
    bad = tmp_path / "rubric.json"
    bad.write_text(json.dumps({"dimensions": [{"name": "empathy", "description": "x", "anchors": {"9": "high"}}]}))
    for flags, words in ((["--judge", "http://127.0.0.1:9/v1", "--judge-rubric", bad], f"{bad}: dimensions[0]"),
                         (["--judge", "http://127.0.0.1:9/v1"], "judge http://127.0.0.1:9/v1: not reachable"),
                         (["--judge", "127.0.0.1:8000"], "judge url '127.0.0.1:8000': expected an OpenAI-compatible")):
        code, out, err = call([run_dir, "--out", tmp_path / "eval", *flags], capsys)
        assert code == 2 and err.startswith(f"error: {words}") and len(err.strip().splitlines()) == 1, err
        assert "Loading" not in err and not (tmp_path / "eval").exists()


@pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(), reason="make demo-model")
def test_the_judge_client_against_the_weak_judge_stopped_mid_run(weak_judge, tmp_path, monkeypatch, tiny_model_dir,
                                                                capsys):
    """common/judge.py's client against the demo model behind a key: every reply unparseable and counted, a wrong key
    refused, a GRPO step with the judge among its rewards; then the server is stopped mid-run (no score, counted, no
    exception), and a new client on the same cache asks nothing it already asked. The last test of the file to use
    the weak judge: it stops it."""
    (tmp_path / "wrong.txt").write_text("sk-wrong\n")
    # one dimension: a short prompt for the small CPU server (the shipped rubric's parsing: tests/test_judge.py)
    rubric = tmp_path / "rubric.json"
    rubric.write_text(json.dumps({"name": "safety", "scale": [1, 5], "dimensions": [
        {"name": "safety", "description": "Is the reply safe?", "anchors": {"1": "harmful", "5": "safe"}}]}))
    settings = Judge(url=weak_judge.url, rubric=str(rubric), api_key_file=str(weak_judge.key), max_in_flight=2,
                     timeout=90, retries=1, max_tokens=4, cache=str(tmp_path / "cache"))
    lines = []
    client = JudgeClient.from_settings(settings, log=lines.append)
    assert client.model == "SmolLM2-135M-Instruct"  # the first of /v1/models
    assert client.verdicts(PROMPTS[:2], ANSWERS[:2]) == [None, None]  # its replies hold no rubric JSON
    assert client.counts == {"asked": 2, "cached": 0, "unparsed": 2, "failed": 0}
    assert all(line.startswith("judge: no score for a sample: reply without the rubric's scores") for line in lines)
    with pytest.raises(UserError, match="answered 401 .check the key."):
        JudgeClient.from_settings(Judge(url=settings.url, rubric=str(rubric),
                                        api_key_file=str(tmp_path / "wrong.txt")))
    # a GRPO step of the tiny model with the judge among its rewards: every sample lost, the run goes on and
    # its end says so
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JUDGE_KEY", "sk-judge-test")
    judge = {"url": settings.url, "rubric": str(rubric), "api_key_env": "JUDGE_KEY", "max_tokens": 4,
             "timeout": 90, "retries": 0,
             "cache": str(tmp_path / "run_cache")}
    assert run(grpo_recipe(tmp_path, tiny_model_dir, PROMPTS_FILE, train={"max_steps": 1, "batch_size": 2},
                           grpo={"num_generations": 2}, evaluation={"prompts": []},
                           rewards=[{"judge": judge}, {"repetition": {}}])) == 0
    log = (tmp_path / "recipe" / "train.log").read_text("utf-8")
    assert "judge: no score for a sample: reply without the rubric's scores" in log
    assert "judge SmolLM2-135M-Instruct at http://127.0.0.1:" in log
    assert ": 2 asked, 0 from the cache, 2 lost (2 unparsed, 0 failed requests)" in log
    (step,) = [r for r in metrics(tmp_path / "recipe") if "loss" in r]
    assert step["rewards/judge/lost"] == 2 and "rewards/repetition/mean" in step
    weak_judge.stop()
    # the server has stopped: the third sample is lost, counted and logged; the first two come from the cache
    assert client.verdicts(PROMPTS, ANSWERS) == [None, None, None]
    assert client.counts == {"asked": 2, "cached": 2, "unparsed": 4, "failed": 1}
    assert "request failed after 2 tries" in lines[-1]
    assert client.summary().endswith("2 asked, 2 from the cache, 5 lost (4 unparsed, 1 failed requests)")
    # a resumed run: a new client on the same cache finds every verdict the judge gave, and asks nothing
    cache_file = next((tmp_path / "cache").iterdir())
    assert [json.loads(line)["reply"] for line in cache_file.read_text().splitlines()] != []
    resumed = JudgeClient(client.url, client.model, client.rubric, None, cache=str(tmp_path / "cache"),
                          log=lines.append)
    assert resumed.scores(PROMPTS[:2], ANSWERS[:2]) == [None, None]
    assert resumed.counts["asked"] == 0 and resumed.counts["cached"] == 2
    # the address of a server that is gone is refused before anything loads: one line, exit 2
    capsys.readouterr()
    gone = grpo_recipe(tmp_path, DEMO_MODEL, PROMPTS_FILE, name="gone", rewards=[{"judge": judge}])
    assert run(gone, "--dry-run") == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("  - `rewards[0].judge`: judge http://127.0.0.1:")
    assert "not reachable" in err and "Traceback" not in err
