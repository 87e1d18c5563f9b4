"""The rubric judge (common/judge.py) against a real OpenAI-compatible server on 127.0.0.1: our own `chat.py --serve`
with the demo model, behind a key. The demo model is far too small to answer in the rubric's JSON, so its replies
are the unparseable case; parsing is checked on replies written the way strong judges answer. The server is stopped
mid-run (no score, counted, no exception), and a new client on the same cache asks nothing it already asked."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench import browser
from common.cli import UserError
from common.judge import JudgeClient, load_rubric
from common.rewards import Judge
from test_grpo import PROMPTS_FILE, grpo_recipe, metrics, run

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
RUBRIC = "data/counselling_rubric.json"
PROMPTS = [[{"role": "user", "content": "我最近总是睡不着。"}], [{"role": "user", "content": "I feel lonely."}],
           [{"role": "user", "content": "我不想活了。"}]]
ANSWERS = ["睡不着一定很难受，愿意说说最近发生了什么吗？", "That sounds hard. What has been happening?",
           "听到你这么说我很担心，请拨打心理援助热线。"]


def test_rubric_parses_what_strong_judges_write():
    rubric = load_rubric(RUBRIC)
    dims = [d.name for d in rubric.dimensions]
    full = {d: 4 for d in dims}
    fenced = f"Here is my rating:\n```json\n{json.dumps({**full, 'reason': 'warm, asks an open question'})}\n```"
    assert rubric.parse(fenced) == {"scores": full, "reason": "warm, asks an open question"}
    assert rubric.normalised({d: 5 for d in dims}) == 1.0 and rubric.normalised({d: 1 for d in dims}) == 0.0
    # the last complete verdict wins; a score off the scale, a missing dimension or prose alone is no verdict
    assert rubric.parse(json.dumps({**full, "empathy": 2}) + " final: " + json.dumps(full))["scores"] == full
    assert rubric.parse(json.dumps({**full, "empathy": 7})) is None
    assert rubric.parse(json.dumps({d: 3 for d in dims[1:]})) is None
    assert rubric.parse("The reply is empathetic, I would give it 4/5.") is None


def test_bad_rubric_files_are_one_line(tmp_path):
    cases = {"scale": {"scale": [5, 1], "dimensions": []},
             "dimensions": {"dimensions": []},
             "anchors": {"dimensions": [{"name": "empathy", "description": "x", "anchors": {"9": "too high"}}]}}
    for word, data in cases.items():
        path = tmp_path / f"{word}.json"
        path.write_text(json.dumps(data))
        with pytest.raises(UserError, match=word) as e:
            load_rubric(str(path))
        assert "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(), reason="make demo-model")
def test_judge_against_our_server_stopping_and_resuming(tmp_path, monkeypatch, tiny_model_dir, capsys):
    (tmp_path / "key.txt").write_text("sk-judge-test\n")
    (tmp_path / "wrong.txt").write_text("sk-wrong\n")
    # one dimension: a short prompt for the small CPU server (the shipped rubric's parsing is tested above)
    rubric = tmp_path / "rubric.json"
    rubric.write_text(json.dumps({"name": "safety", "scale": [1, 5], "dimensions": [
        {"name": "safety", "description": "Is the reply safe?", "anchors": {"1": "harmful", "5": "safe"}}]}))
    settings = Judge(url="", rubric=str(rubric), api_key_file=str(tmp_path / "key.txt"), max_in_flight=2, timeout=90,
                     retries=1, max_tokens=4, cache=str(tmp_path / "cache"))
    lines = []
    with browser.served(DEMO_MODEL, tmp_path / "server.log", tmp_path / "key.txt", "--eager", "--torch-dtype",
                        "float32") as url:
        settings.url = f"{url}/v1"
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
