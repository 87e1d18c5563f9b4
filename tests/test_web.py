"""`chat.py --serve`'s web page in a real browser (headless Chromium through Selenium, bench/browser.py): a tiny
llama trained a few steps by train.py and evaluated by eval.py, served with a key, one server process for the module.
The chat streams the API's greedy answer to a Chinese question; Compare streams two different answers (the adapter
off and on) and saves a rating as a preference pair common/pairs.py reads; a thumb on a chat answer is saved as a
rated answer common/unpaired.py reads (train.method kto); the Run tab draws every logged step and
the held-out table, and redraws while metrics.jsonl grows; a wrong key is told plainly; a phone-sized window has no
horizontal overflow; everything the page loads comes from this server. Skipped, with the reason, where chromium,
chromedriver, the CJK fonts or selenium is missing (failed under CI=true: tests/conftest.py `require_tool`)."""
import json
import sys
from pathlib import Path

import httpx2
import openai
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval as eval_script  # noqa: E402
import train  # noqa: E402
from bench import browser  # noqa: E402
from common import artifacts, webpage  # noqa: E402

from tests.tools import require_tool  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def browser_here():
    require_tool(browser.missing() and f"no browser: {browser.missing()}")

KEY = "sk-web-test"
SYSTEM = "你是一位心理咨询师。"
QUESTION = "我最近总是失眠，怎么办？"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    """A run as train.py and eval.py leave it: 6 logged steps, eval loss at steps 3 and 6, final/, eval/report.json.
    A high learning rate, so that the adapter changes the greedy answers (Compare must show two)."""
    root = tmp_path_factory.mktemp("web_run")
    records = json.loads((ROOT / "data" / "psych_sample.json").read_text(encoding="utf-8"))
    (root / "train.json").write_text(json.dumps(records[:8], ensure_ascii=False), encoding="utf-8")
    (root / "held_out.json").write_text(json.dumps(records[8:10], ensure_ascii=False), encoding="utf-8")
    recipe = {"model": {"path": str(tiny_model_dir), "dtype": "float32"},
              "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
              "data": {"path": str(root / "train.json"), "eval_path": str(root / "held_out.json"),
                       "template": "qwen_chat", "system": SYSTEM, "max_length": 128},
              "train": {"output_dir": str(root / "run"), "batch_size": 2, "max_steps": 6, "lr": 2e-2,
                        "save_steps": 6, "logging_steps": 1, "warmup_ratio": 0.0},
              "evaluation": {"every_n_steps": 3, "prompts": [QUESTION], "max_new_tokens": 4, "temperature": 0}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    assert train.main([str(root / "recipe.yaml")]) in (0, None)
    assert eval_script.main([str(root / "run"), "--limit", "1", "--max-new-tokens", str(MAX_TOKENS),
                             "--torch-dtype", "float32"]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("web_server")
    (logs / "key.txt").write_text(KEY + "\n")
    # float32 as trained: `auto` would be bfloat16 on a CPU with native bf16, and the tiny model's answers with it
    with browser.served(run_dir, logs / "server.log", logs / "key.txt", "--torch-dtype", "float32") as url:
        assert f"web page {url}/ " in (logs / "server.log").read_text()  # the start-up line tells where the page is
        yield url


@pytest.fixture(scope="module")
def driver():
    driver = browser.chromium()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(driver, server):
    """The page, opened once: it asks for the key, is given a wrong one, then the right one."""
    driver.get(server + "/")
    browser.wait_for(driver, "performance.getEntriesByType('navigation')[0].loadEventEnd", "the page loaded")
    browser.wait_for(driver, "!document.getElementById('key-form').hidden", "the key form")
    asked = browser.text_of(driver, "key-message")
    browser.enter_key(driver, "sk-wrong")
    browser.wait_for(driver, "!document.getElementById('key-form').hidden && "
                             "document.getElementById('key-message').textContent.includes('refused')", "the refusal")
    refused = browser.text_of(driver, "key-message")
    browser.enter_key(driver, KEY)
    browser.wait_for(driver, "document.body.dataset.ready", "the page ready")
    return {"driver": driver, "url": server, "asked": asked, "refused": refused}


def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(url, model, question) -> str:
    """The API's greedy answer, with the run's system prompt, as the page sends it."""
    answer = client(url).chat.completions.create(model=model, temperature=0, max_tokens=MAX_TOKENS, messages=[
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
    return answer.choices[0].message.content


# ---------------------------------------------------------------- the page in the browser

def test_the_page_loads_and_asks_for_the_key_once(page):
    assert page["asked"] == "This server needs its API key."
    assert "refused this key" in page["refused"] and "incorrect API key" in page["refused"]
    driver = page["driver"]
    assert driver.execute_script("return sessionStorage.getItem('sft-api-key')") == KEY
    assert not driver.find_element("id", "key-form").is_displayed()
    assert browser.text_of(driver, "model-id") == "run"  # the run's name
    # Everything the page loaded came from this server: no CDN, font or script from elsewhere.
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map(r => r.name)")
    assert loaded and all(name.startswith(page["url"] + "/") for name in loaded), loaded


def test_the_chat_streams_the_apis_greedy_answer_to_a_chinese_question(page):
    driver = page["driver"]
    browser.set_sampling(driver, temperature=0, max_tokens=MAX_TOKENS)
    shown = browser.chat(driver, QUESTION)
    assert shown and shown == greedy(page["url"], "run", QUESTION)
    chunks = driver.execute_script("const m = document.querySelectorAll('.message.assistant');"
                                   "return Number(m[m.length - 1].dataset.chunks);")
    assert chunks > 1  # streamed: several server-sent events, not one body
    # A second turn goes with the first (the server re-renders the whole conversation), and Regenerate repeats it.
    second = browser.chat(driver, "谢谢")
    expected = client(page["url"]).chat.completions.create(
        model="run", temperature=0, max_tokens=MAX_TOKENS,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION},
                  {"role": "assistant", "content": shown}, {"role": "user", "content": "谢谢"}])
    assert second == expected.choices[0].message.content
    driver.find_element("id", "regenerate").click()
    browser.wait_for(driver, "document.body.dataset.chat === 'idle' && "
                             "document.querySelectorAll('.message.assistant').length === 2", "the regenerated answer")
    assert driver.execute_script("const m = document.querySelectorAll('.message.assistant');"
                                 "return m[1].querySelector('.text').textContent;") == second
    driver.find_element("id", "new").click()
    assert driver.find_elements("css selector", ".message") == []


def test_compare_streams_two_different_answers_and_saves_the_rating_as_a_pair(page, run_dir):
    from common.pairs import load_pairs

    driver = page["driver"]
    browser.set_sampling(driver, temperature=0, max_tokens=MAX_TOKENS)
    base, tuned = browser.compare(driver, QUESTION)
    assert base == greedy(page["url"], "run:base", QUESTION)  # the adapter switched off
    assert tuned == greedy(page["url"], "run", QUESTION)
    assert base and tuned and base != tuned, "the trained adapter should change the tiny model's greedy answer"
    assert driver.find_element("id", "rate").is_displayed()
    driver.find_element("id", "prefer-tuned").click()
    ratings = run_dir / artifacts.RATINGS_FILE
    browser.wait_for(driver, "document.getElementById('rated').textContent.includes('Saved')", "the rating saved")
    assert str(ratings) in browser.text_of(driver, "rated") and "1 rating(s)" in browser.text_of(driver, "rated")
    [pair] = load_pairs([str(ratings)])
    assert (pair.chosen, pair.rejected) == (tuned, base)
    assert [(t.system, t.input) for t in pair.prompt] == [(SYSTEM, QUESTION)]


def test_a_thumb_on_a_chat_answer_is_a_kto_row_beside_the_pair(page, run_dir):
    """Thumbs down on an answer: appended to the ratings file as a rated answer (its conversation, the answer, bad),
    which train.method kto reads beside Compare's pair (as two more); the pair readers still find the one pair."""
    from common.pairs import load_pairs
    from common.unpaired import load_rated

    driver = page["driver"]
    browser.set_sampling(driver, temperature=0, max_tokens=MAX_TOKENS)
    browser.show_tab(driver, "chat")
    driver.find_element("id", "new").click()
    shown = browser.chat(driver, QUESTION)
    last = "[...document.querySelectorAll('.message.assistant')].pop()"
    driver.execute_script(f"{last}.querySelector('.thumb.down').click();")
    browser.wait_for(driver, f"{last}.dataset.rated === 'down'", "the thumb saved")
    ratings = run_dir / artifacts.RATINGS_FILE
    note = browser.text_of(driver, "chat-note")
    assert "Saved as bad: 2 rating(s)" in note and str(ratings) in note
    assert driver.execute_script(f"return [...{last}.querySelectorAll('.thumb')].every(b => b.disabled);")
    *_, thumb = load_rated([str(ratings)])
    assert (thumb.completion, thumb.label) == (shown, False)
    assert [(t.system, t.input) for t in thumb.prompt] == [(SYSTEM, QUESTION)]
    assert len(load_rated([str(ratings)])) == 3 and len(load_pairs([str(ratings)])) == 1
    driver.find_element("id", "new").click()


def test_the_run_tab_draws_every_step_and_the_held_out_table_and_follows_the_metrics(page, run_dir):
    driver = page["driver"]
    browser.show_run(driver)
    metrics = [json.loads(line) for line in (run_dir / artifacts.METRICS_FILE).read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    assert len(steps) == 6 and len(evals) == 2
    points = "document.querySelector('#chart polyline.loss').getAttribute('points').split(' ').length"
    assert browser.wait_for(driver, points, "the loss curve") == len(steps)
    assert len(driver.find_elements("css selector", "#chart circle.eval-loss")) == len(evals) + 1  # + the legend's
    recipe = dict(driver.execute_script(
        "return [...document.querySelectorAll('#recipe tr')].map(r => [...r.cells].map(c => c.textContent));"))
    assert recipe["template"] == "qwen_chat" and recipe["steps"].startswith("6 steps")
    report = json.loads((run_dir / artifacts.EVAL_DIR / artifacts.EVAL_REPORT).read_text())
    table = driver.execute_script(
        "return [...document.querySelectorAll('#held-out tr')].map(r => [...r.cells].map(c => c.textContent));")
    assert table[0] == ["held-out", "base", "tuned"]
    assert table[1] == ["loss (answer tokens)", f"{report['base']['loss']:.4f}", f"{report['tuned']['loss']:.4f}"]
    answers = driver.execute_script("return [...document.querySelectorAll('#report-answers .answer')]"
                                    ".map(a => a.textContent);")
    assert answers == [text for a in report["answers"] for text in (a["base"], a["tuned"])]
    # A run still training: a new line in metrics.jsonl is drawn at the next refresh, a half-written one skipped.
    with open(run_dir / artifacts.METRICS_FILE, "a") as f:
        f.write(json.dumps({"step": 7, "loss": 1.0}) + "\n" + '{"step": 8, "lo')
    browser.wait_for(driver, f"{points} === {len(steps) + 1}", "the new step", seconds=10)


def test_the_run_tab_shows_the_judged_table_the_win_rate_and_the_benchmarks(page, run_dir):
    from common import judging

    driver, path = page["driver"], run_dir / artifacts.EVAL_DIR / artifacts.EVAL_REPORT
    plain = path.read_text()
    assert driver.execute_script("return document.getElementById('judged').hidden")  # a report without a judge
    report = json.loads(plain)
    # the parts eval.py --judge and --tasks add (common/judging.py, common/benchmarks.py), from their own functions
    verdicts = [{"base_first": "tuned", "tuned_first": "tuned"}, {"base_first": "base", "tuned_first": "tuned"},
                {"base_first": "tie", "tuned_first": "tuned"}, {"base_first": None, "tuned_first": "base"}]
    report["judged"] = {
        "judge": {"url": "http://127.0.0.1:8000/v1", "model": "Qwen2.5-72B-Instruct", "rubric": "counselling",
                  "scale": [1, 5]},
        "points": 4, "judged": {"base": 4, "tuned": 3}, "lost": {"base": 0, "tuned": 1},
        "rubric": {"empathy": {"base": judging.summarise([2, 3, 2, 2]), "tuned": judging.summarise([4, 4, 5])}},
        "pairwise": judging.pairwise(verdicts)}
    report["benchmarks"] = {"lm_eval": "0.4.13", "samples": {"facts_mc": 12}, "limit": None,
                            "tasks": {"facts_mc": {"acc": {"base": 0.5, "tuned": 0.4167}}}}
    path.write_text(json.dumps(report))
    try:
        driver.refresh()
        browser.wait_for(driver, "document.body.dataset.ready", "the page ready")
        browser.show_run(driver)
        browser.wait_for(driver, "!document.getElementById('judged').hidden", "the judged table")
        rows = driver.execute_script(
            "return [...document.querySelectorAll('#judged-table tr')].map(r => [...r.cells].map(c => c.textContent));")
        e = report["judged"]["rubric"]["empathy"]
        assert rows == [["dimension", "base", "tuned"], ["empathy", judging._interval(e["base"]),
                                                          judging._interval(e["tuned"])]]
        assert rows[1][2] == "4.33 [4.00, 5.00]"
        pw = report["judged"]["pairwise"]
        win = browser.text_of(driver, "win-rate")
        assert f"tuned wins 2, ties 1, loses 0; win rate {pw['win_rate']:.2f} [{pw['low']:.2f}, {pw['high']:.2f}]" in win
        assert "flipped with the order on 67% of the turns (the judge's position bias" in win
        assert "Qwen2.5-72B-Instruct" in browser.text_of(driver, "judged-facts")
        bench = driver.execute_script(
            "return [...document.querySelectorAll('#benchmarks-table tr')].map(r => [...r.cells].map(c => c.textContent));")
        assert bench == [["lm-eval 0.4.13", "base", "tuned"], ["facts_mc acc", "0.5000", "0.4167"]]
    finally:
        path.write_text(plain)


def test_a_phone_sized_window_keeps_the_chat_usable_without_horizontal_overflow(page):
    driver = page["driver"]
    driver.set_window_size(390, 844)
    try:
        driver.refresh()  # the key stays: sessionStorage lives as long as the tab
        browser.wait_for(driver, "document.body.dataset.ready", "the page ready")
        browser.set_sampling(driver, temperature=0, max_tokens=MAX_TOKENS)
        assert browser.chat(driver, QUESTION) == greedy(page["url"], "run", QUESTION)
        width = driver.execute_script("return window.innerWidth")
        for tab in ("chat", "compare", "run"):
            browser.show_tab(driver, tab)
            assert driver.execute_script("return document.documentElement.scrollWidth") <= width, tab
        browser.show_tab(driver, "chat")
        for element_id in ("question", "send"):
            box = driver.find_element("id", element_id).rect
            assert box["x"] >= 0 and box["x"] + box["width"] <= width and box["width"] > 0, element_id
    finally:
        driver.set_window_size(1200, 900)


# ---------------------------------------------------------------- the endpoints behind it

def test_the_base_is_a_second_model_id_and_other_ids_are_404(server):
    assert [m.id for m in client(server).models.list().data] == ["run", "run:base"]
    body = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
            "temperature": 0, "max_tokens": MAX_TOKENS}  # no `model`: the served (tuned) model
    response = httpx2.post(server + "/v1/chat/completions", json=body, timeout=60,
                           headers={"Authorization": f"Bearer {KEY}"})
    assert response.json()["choices"][0]["message"]["content"] == greedy(server, "run", QUESTION)
    with pytest.raises(openai.NotFoundError, match="model_not_found|not served"):
        client(server).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_the_pages_endpoints_take_the_apis_key_and_refuse_a_bad_rating(server, run_dir):
    assert httpx2.get(server + "/", timeout=10).status_code == 200  # the page itself holds nothing to protect
    for path in ("/web/info", "/web/run"):
        assert httpx2.get(server + path, timeout=10).status_code == 401
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    ratings = run_dir / artifacts.RATINGS_FILE
    before = ratings.read_bytes() if ratings.exists() else b""
    same = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "a"}
    response = httpx2.post(server + "/web/ratings", json=same, headers=headers, timeout=10)
    assert response.status_code == 400 and "identical to chosen" in response.json()["error"]["message"]
    unrated = {"prompt": [{"role": "user", "content": "hi"}], "answer": "a", "good": "yes"}
    response = httpx2.post(server + "/web/thumbs", json=unrated, headers=headers, timeout=10)
    assert response.status_code == 400
    assert "expected true (a good answer) or false" in response.json()["error"]["message"]
    assert httpx2.post(server + "/web/thumbs", json=unrated, timeout=10).status_code == 401
    assert (ratings.read_bytes() if ratings.exists() else b"") == before  # nothing written


def test_a_model_served_without_a_run_has_a_run_tab_that_says_so(tiny_model_dir, tokenizer):
    from common.generation import Generator, Sampling
    from common.server.request import served_models
    from common.templates import get_template

    source = artifacts.resolve_model(str(tiny_model_dir))
    page = webpage.Page.of(source, "tiny", served_models("tiny", adapter=False), Sampling(), None,
                           Generator(None, tokenizer, get_template("tokenizer")))
    assert page.run()["run"] is None and "not part of a training run" in page.run()["note"]
    assert page.info()["base"] is None and page.info()["ratings"] is None
