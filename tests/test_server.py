"""The server's parts without a server: the OpenAI request checks as plain functions (each bad field an OpenAI-shaped
4xx with one clear message; test_serve.py keeps one of each kind end to end), and the web page's rating count."""
import json
from types import SimpleNamespace

import pytest

from common import artifacts
from common.generation import Sampling
from common.server.errors import ApiError
from common.server.request import BASE_SUFFIX, parse_request, served_models
from common.webpage import Page

CONTEXT = 1024  # the tiny test model's context
MODELS = served_models("tiny", adapter=True)
HI = [{"role": "user", "content": "hi"}]


def refused(body, status=400) -> dict:
    """parse_request's ApiError for `body` (a dict is sent as JSON), checked for OpenAI's shape; its error object."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ApiError) as caught:
        parse_request(raw, Sampling(), "system", CONTEXT, MODELS)
    e = caught.value
    error = e.body()["error"]
    assert e.status == status and set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "\n" not in error["message"]
    return error


@pytest.mark.parametrize("body, param, words", [
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "must be a JSON object, got a list"),
    ({}, "messages", "non-empty list"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": "hi"}, "messages", "non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages", "unknown role 'tool'"),
    ({"messages": [{"content": "hi"}]}, "messages", "role: missing"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, "messages", "expected a string"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages", "expected a string"),
    ({"messages": ["hi"]}, "messages", "expected an object"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages", "no user message to answer"),
    ({"messages": HI + [{"role": "assistant", "content": "hello"}]}, "messages", "no user message to answer"),
    ({"messages": HI, "n": 2}, "n", "n > 1"),
    ({"messages": HI, "max_tokens": 5000}, "max_tokens", "leaves no room"),
    ({"messages": HI, "max_completion_tokens": 5000}, "max_tokens", "leaves no room"),
    ({"messages": HI, "max_tokens": 0}, "max_tokens", "integer of at least 1"),
    ({"messages": HI, "max_tokens": "8"}, "max_tokens", "integer"),
    ({"messages": HI, "max_tokens": True}, "max_tokens", "integer"),
    ({"messages": HI, "temperature": 3}, "temperature", "from 0 to 2"),
    ({"messages": HI, "top_p": "high"}, "top_p", "from 0 to 1"),
    ({"messages": HI, "seed": -1}, "seed", "integer"),
    ({"messages": HI, "seed": 2 ** 63}, "seed", "integer from 0 to"),
    ({"messages": HI, "stop": [1]}, "stop", "string or a list of strings"),
    ({"messages": HI, "stream": "yes"}, "stream", "true or false"),
    ({"messages": HI, "stream": True, "stream_options": 1}, "stream_options", "must be an object"),
    ({"messages": HI, "stream": True, "stream_options": {"include_usage": "y"}}, "stream_options.include_usage",
     "true or false"),
    # Hostile bodies: refused before they reach the tokenizer or the JSON encoder (each was a 500).
    (b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages", "messages[0].content: a lone surrogate"),
    (b'{"messages": [{"role": "user", "content": "hi \xed\xa0\x80"}]}', None, "not valid UTF-8"),
    (b'{"stop": ["\\udfff"], "messages": [{"role": "user", "content": "hi"}]}', "stop", "lone surrogate"),
    (b'{"messages": [{"role": "user", "content": "hi", "\\udc00": 1}]}', "messages", "a key of messages[0]: a lone"),
    (b"[" * 10_000 + b"]" * 10_000, None, "nested more than"),
    ({"messages": HI, "x": json.loads("[" * 33 + "]" * 33)}, None, "nested more than"),  # MAX_DEPTH + 1
    # OpenAI fields the server does not implement: named, not ignored.
    ({"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "`tools` is not supported"),
    ({"messages": HI, "presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"messages": HI, "frequency_penalty": -1}, "frequency_penalty", "not supported"),
    ({"messages": HI, "logprobs": True}, "logprobs", "not supported"),
    ({"messages": HI, "top_logprobs": 2}, "top_logprobs", "not supported"),
])
def test_a_bad_request_is_a_400_naming_its_field(body, param, words):
    bodies = [body] if not isinstance(body, dict) or "stream" in body else [body, {**body, "stream": True}]
    for sent in bodies:  # refused before any event: the same error, streaming or not
        error = refused(sent)
        assert words in error["message"] and error["param"] == param, error
        assert error["type"] == "invalid_request_error"


def test_a_model_not_served_is_a_404_naming_those_that_are():
    for model in ("gpt-4o", 5):
        error = refused({"model": model, "messages": HI}, status=404)
        assert error["code"] == "model_not_found" and "tiny, tiny:base" in error["message"]


def test_a_good_request_becomes_what_to_generate():
    defaults = Sampling(max_new_tokens=99, temperature=0.1, top_p=0.75)
    body = {"model": "tiny" + BASE_SUFFIX, "messages": [{"role": "developer", "content": "be brief"}] + HI,
            "max_completion_tokens": 8, "temperature": 0, "seed": 3, "stop": "\n", "stream": True,
            "stream_options": {"include_usage": True}, "tools": [], "logprobs": False, "presence_penalty": 0}
    chat = parse_request(json.dumps(body).encode(), defaults, "server prompt", CONTEXT, MODELS)
    assert chat.messages == [{"role": "system", "content": "be brief"}] + HI  # the request's system prompt, not ours
    assert (chat.sampling.max_new_tokens, chat.sampling.temperature, chat.sampling.top_p, chat.sampling.seed) == (
        8, 0.0, 0.75, 3)
    assert chat.stop == ["\n"] and chat.stream and chat.include_usage and chat.adapter is False
    plain = parse_request(json.dumps({"messages": HI}).encode(), defaults, "server prompt", CONTEXT, MODELS)
    assert plain.messages == [{"role": "system", "content": "server prompt"}] + HI
    assert plain.sampling == defaults and not plain.stream and not plain.include_usage and plain.adapter is True


def test_ratings_are_counted_from_the_bytes_added_not_by_rereading_the_file(tmp_path):
    page = Page("run", "run:base", None, Sampling(), None, SimpleNamespace(run_dir=tmp_path, adapter=None))
    ratings = tmp_path / artifacts.RATINGS_FILE
    pair = {"prompt": HI, "chosen": "a", "rejected": "b"}
    assert [page.rate(pair)["ratings"] for _ in range(2)] == [1, 2]
    with open(ratings, "a") as f:  # another writer appends (a second server on the same run)
        f.write(ratings.read_text().splitlines()[0] + "\n")
    assert page.rate(pair) == {"saved": str(ratings), "ratings": 4}
    # Bytes already counted are not read again: a newline taken out of them in place leaves the count as it was.
    text = ratings.read_bytes()
    with open(ratings, "r+b") as f:
        f.seek(text.index(b"\n"))
        f.write(b" ")
    assert page.rate(pair)["ratings"] == 5
    # A file replaced (a new inode) is counted afresh, once; so is an existing file for a new server.
    replaced = tmp_path / "new.jsonl"
    replaced.write_bytes(text.splitlines(keepends=True)[0])
    replaced.replace(ratings)
    assert page.rate(pair)["ratings"] == 2
    fresh = Page("run", "run:base", None, Sampling(), None, SimpleNamespace(run_dir=tmp_path, adapter=None))
    assert fresh.rate(pair)["ratings"] == 3 == len(ratings.read_text().splitlines())


@pytest.mark.parametrize("gather, prefills", [(2.0, [3]), (0, [1, 1, 1])])
def test_an_idle_worker_gathers_requests_that_arrive_together_into_one_prefill(tiny_model_dir, gather, prefills):
    """Three requests reaching an idle worker 0.3 s apart: with `gather` longer than that, the worker waits for each
    next one and prefills all three in one forward (one pass over the weights for the three prompts, as when eight
    clients' next requests arrive together); without, each is prefilled alone as it comes (its answer of 4 tokens
    ends before the next arrives)."""
    import threading
    import time

    from starlette.testclient import TestClient

    from common.generation import Generator
    from common.modeling import load_for_generation
    from common.server.app import create_app
    from common.server.worker import Worker
    from common.templates import get_template

    model, tokenizer = load_for_generation(artifacts.resolve_model(str(tiny_model_dir)))
    rows = []  # the rows of each prefill forward (more than one position per row)
    model.register_forward_hook(lambda module, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0])
                                if kwargs["input_ids"].shape[1] > 1 else None, with_kwargs=True)
    generator = Generator(model, tokenizer, get_template("qwen_chat"), max_length=256)
    app = create_app(Worker(generator, queue_size=0, max_batch=3, gather=gather), "tiny",
                     Sampling(max_new_tokens=4))
    replies = []
    with TestClient(app, base_url="http://127.0.0.1") as client:
        def ask(question):
            replies.append(client.post("/v1/chat/completions", json={"messages": [
                {"role": "user", "content": question}], "temperature": 0, "max_tokens": 4}))

        threads = []
        for question in ("你好", "我最近很焦虑，晚上睡不着", "hi"):
            threads.append(threading.Thread(target=ask, args=(question,)))
            threads[-1].start()
            time.sleep(0.3)
        for thread in threads:
            thread.join(timeout=30)
    assert [r.status_code for r in replies] == [200] * 3
    assert rows == prefills
