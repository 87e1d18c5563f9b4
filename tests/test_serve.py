"""`chat.py --serve` as a real process on a free local port, talked to with the official `openai` client and with raw
HTTP (httpx2, the client's own HTTP library): answers equal `chat.py --once`, streaming equals non-streaming, requests
queue one at a time (429 when the queue is full), a client that leaves cancels its generation, each kind of bad input
(body, field, model, key, size, media type, host, origin) is a 4xx in OpenAI's error shape, and the server goes on
serving. The request checks one by one: test_server.py, without a server."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2
import openai
import pytest
import torch

import chat
from bench import browser
from common.generation import Generator
from common.modeling import load_tokenizer
from common.server import API_KEY_ENV, PREFILL_CHUNK
from common.server.access import api_key_from
from common.templates import get_template

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
KEY = "sk-test-key"
SYSTEM = "你是一位心理咨询师。"
QUESTION = "我最近很焦虑"
START_TIMEOUT = 120  # seconds for the process to load the model and answer /health
POLL = 0.1  # seconds between /health polls
# One torch thread in the server (and in the --once reference, for the same arithmetic): two processes whose thread
# pools spin against each other on a busy 2-core machine generate up to 50 times slower.
SERVER_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
MAX_BYTES = 64 * 1024  # the tiny server's --max-request-bytes: room for LONG_PROMPT (about 12 kB)
LONG = 900  # max_tokens that keep the tiny model busy for a second or two on 2 cores (its context is 1024)


class Server:
    """A `chat.py --serve` process on a free port; its output goes to a file (a pipe nobody reads could fill up
    and stall it) that failures show."""

    def __init__(self, log_dir: Path, model: Path, *flags: str, key: str = None):
        self.port, self.key, self.log = browser.free_port(), key, log_dir / "server.log"
        argv = [sys.executable, "chat.py", str(model), "--serve", "--port", str(self.port), *flags]
        if key:  # from a file, as a user should give it (not on the command line, where `ps` shows it)
            (log_dir / "key.txt").write_text(key + "\n")
            argv += ["--api-key-file", str(log_dir / "key.txt")]
        env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}  # a keyless server stays keyless
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env={**env, **SERVER_ENV})
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        browser.wait_ready(self.url, self.proc, self.log, START_TIMEOUT)

    def stop(self) -> None:
        browser.stop_process(self.proc)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-4000:]

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.key or "unused", max_retries=0, timeout=60,
                             **kwargs)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def post(self, body, **kwargs) -> httpx2.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx2.post(f"{self.url}/v1/chat/completions", content=content, timeout=kwargs.pop("timeout", 60),
                           headers={"Content-Type": "application/json", **self.headers()}, **kwargs)

    def health(self) -> dict:
        return httpx2.get(f"{self.url}/health", timeout=10).json()

    def wait_health(self, condition, what: str, seconds: float = 30) -> dict:
        for _ in range(int(seconds / POLL)):
            health = self.health()
            if condition(health):
                return health
            time.sleep(POLL)
        raise AssertionError(f"/health never showed {what}: last {health}")

    def wait_idle(self) -> None:
        self.wait_health(lambda h: h["running"] == 0 and h["waiting"] == 0, "an idle server")


def start(request, tmp_path_factory, model, *flags, key=None) -> Server:
    server = Server(tmp_path_factory.mktemp("serve"), model, *flags, key=key)
    request.addfinalizer(server.stop)  # registered before waiting: a server that never gets ready is killed too
    server.wait_ready()
    return server


@pytest.fixture(scope="module")
def tiny(request, tmp_path_factory, tiny_model_dir):
    """The tiny model behind a key, a system prompt, one request at a time and room for one waiting."""
    return start(request, tmp_path_factory, tiny_model_dir, "--system", SYSTEM, "--queue-size", "1", "--max-batch", "1",
                 "--max-request-bytes", str(MAX_BYTES), key=KEY)


@pytest.fixture(scope="module")
def keyless(request, tmp_path_factory, tiny_model_dir):
    """The tiny model without a key, giving clients one second to send a request; four requests decode together
    and two more may wait."""
    return start(request, tmp_path_factory, tiny_model_dir, "--read-timeout", "1", "--max-batch", "4",
                 "--queue-size", "2")


@pytest.fixture(scope="module")
def demo(request, tmp_path_factory):
    if not (DEMO_MODEL / "config.json").is_file():
        pytest.skip(f"{DEMO_MODEL} is missing (make demo-model)")
    # float32: the same arithmetic on every machine (auto picks bfloat16 where the CPU has it natively). No prompt
    # cache: the load test asks again what it asked alone, and prompts kept whole would skip the prefills under load
    # it checks (tests/test_chat.py compares cached turns with uncached ones)
    return start(request, tmp_path_factory, DEMO_MODEL, "--torch-dtype", "float32", "--prompt-cache", "0")


def once(capsys, model, question, max_new_tokens, *flags) -> str:
    """What `chat.py MODEL --once QUESTION --temperature 0` prints, without its final newline."""
    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs (SERVER_ENV)
    try:
        chat.main([str(model), "--once", question, "--temperature", "0", "--max-new-tokens", str(max_new_tokens),
                   "--no-stream", *flags])
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1]


def served(client) -> str:
    """The id of the model the server serves (the first /v1/models lists): a request naming another is a 404."""
    return client.models.list().data[0].id


def ask(client, question, **kwargs):
    return client.chat.completions.create(model=served(client), messages=[{"role": "user", "content": question}],
                                          **kwargs)


def ask_streaming(client, question, **kwargs):
    """(first chunk, the content deltas, the chunk with finish_reason, a usage chunk or None)."""
    chunks = list(ask(client, question, stream=True, **kwargs))
    assert len(chunks) < 10_000
    usage = chunks.pop() if chunks[-1].usage is not None and not chunks[-1].choices else None
    deltas = [c.choices[0].delta.content for c in chunks[1:-1]]
    return chunks[0], deltas, chunks[-1], usage


def is_openai_error(response: httpx2.Response, status: int) -> dict:
    body = response.json()
    assert response.status_code == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "\n" not in error["message"] and "Traceback" not in error["message"]
    return error


# ---------------------------------------------------------------- the tiny model

def test_models_health_and_the_key(tiny, tiny_model_dir):
    health = tiny.health()  # no key needed: a liveness probe
    assert health == {"status": "ok", "model": tiny_model_dir.name, "running": 0, "waiting": 0,
                      "cancelled": health["cancelled"]}
    models = tiny.client().models.list()
    assert [m.id for m in models.data] == [tiny_model_dir.name]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for response in (httpx2.get(f"{tiny.url}/v1/models", headers=headers, timeout=10),
                         httpx2.post(f"{tiny.url}/v1/chat/completions", headers=headers, timeout=10,
                                     json={"messages": [{"role": "user", "content": "hi"}]})):
            assert is_openai_error(response, 401)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{tiny.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_greedy_answer_equals_chat_once_with_usage_and_length(tiny, tiny_model_dir, capsys):
    expected = once(capsys, tiny_model_dir, QUESTION, 16, "--system", SYSTEM)
    answer = ask(tiny.client(), QUESTION, temperature=0, max_tokens=16)
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason == "length" and answer.usage.completion_tokens == 16  # cut by max_tokens
    # The prompt counted is the --once prompt: the server's system prompt, then the question.
    prompt = Generator(None, load_tokenizer(tiny_model_dir), get_template("tokenizer")).prompt_ids(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}])
    assert answer.usage.prompt_tokens == len(prompt)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 16
    assert answer.model == tiny_model_dir.name and answer.id.startswith("chatcmpl-")


def test_a_system_message_in_the_request_replaces_the_servers(tiny):
    client = tiny.client()
    default = ask(client, QUESTION, temperature=0, max_tokens=4)
    own = client.chat.completions.create(model=served(client), temperature=0, max_tokens=4, messages=[
        {"role": "system", "content": "hi"}, {"role": "user", "content": QUESTION}])
    both = client.chat.completions.create(model=served(client), temperature=0, max_tokens=4, messages=[
        {"role": "system", "content": SYSTEM + "hi"}, {"role": "user", "content": QUESTION}])
    # One system prompt either way: the request's, not the server's on top of it.
    assert own.usage.prompt_tokens < default.usage.prompt_tokens < both.usage.prompt_tokens


def test_streaming_deltas_join_to_the_non_streaming_answer(tiny):
    client = tiny.client()
    whole = ask(client, QUESTION, temperature=0, max_tokens=120)
    first, deltas, last, usage = ask_streaming(client, QUESTION, temperature=0, max_tokens=120,
                                               stream_options={"include_usage": True})
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    assert all(deltas) and "".join(deltas) == whole.choices[0].message.content
    assert last.choices[0].finish_reason == "length" and last.choices[0].delta.content is None
    assert usage.usage.model_dump() == whole.usage.model_dump()
    assert first.id == last.id and first.object == "chat.completion.chunk"
    # On the wire: data lines, the last one [DONE].
    with httpx2.stream("POST", f"{tiny.url}/v1/chat/completions", headers=tiny.headers(), timeout=60, json={
            "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 4,
            "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: {") for line in lines[:-1])


def test_stop_words_temperature_top_p_and_seed(tiny):
    client = tiny.client()
    full = ask(client, QUESTION, temperature=0, max_tokens=120).choices[0].message.content
    # A clean two-character piece of the greedy answer as a stop word: the answer ends just before it.
    at = next(i for i in range(1, len(full) - 1) if "\ufffd" not in full[i:i + 2] and full.find(full[i:i + 2]) == i)
    for stop in (full[at:at + 2], ["never in the answer", full[at:at + 2]]):
        answer = ask(client, QUESTION, temperature=0, max_tokens=120, stop=stop)
        assert answer.choices[0].message.content == full[:at]
        assert answer.choices[0].finish_reason == "stop" and answer.usage.completion_tokens < 120
    sampled = [ask(client, QUESTION, temperature=1.5, top_p=0.9, seed=seed, max_tokens=24).choices[0].message.content
               for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]  # a seed makes sampling repeatable


def test_two_concurrent_clients_both_get_complete_answers(tiny):
    tiny.wait_idle()
    client = tiny.client()
    questions = [QUESTION, "你好"]
    expected = [ask(client, q, temperature=0, max_tokens=200).choices[0].message.content for q in questions]
    results = [None, None]

    def non_streaming():
        results[0] = ask(client, questions[0], temperature=0, max_tokens=200).choices[0].message.content

    def streaming():
        results[1] = "".join(ask_streaming(client, questions[1], temperature=0, max_tokens=200)[1])

    threads = [threading.Thread(target=non_streaming), threading.Thread(target=streaming)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert results == expected


def test_a_full_queue_answers_429_and_the_server_goes_on(tiny, tiny_model_dir):
    tiny.wait_idle()
    queued = {}

    def short_request():
        queued["response"] = tiny.post({"messages": [{"role": "user", "content": "你好"}], "temperature": 0,
                                        "max_tokens": 8})

    # --queue-size 1: one long answer streaming, one request waiting, then several more at once: all refused.
    running = tiny.client().chat.completions.create(model=tiny_model_dir.name, stream=True, max_tokens=LONG,
                                                    temperature=0, messages=[{"role": "user", "content": QUESTION}])
    waiting = threading.Thread(target=short_request)
    try:
        next(iter(running))  # the role chunk: this one is being answered
        waiting.start()
        tiny.wait_health(lambda h: h["waiting"] == 1, "a waiting request")
        refused = []
        more = [threading.Thread(target=lambda: refused.append(tiny.post(
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))) for _ in range(3)]
        for t in more:
            t.start()
        for t in more:
            t.join(timeout=60)
        assert len(refused) == 3
        for response in refused:
            error = is_openai_error(response, 429)
            assert error["type"] == "rate_limit_error" and "retry later" in error["message"]
        with pytest.raises(openai.RateLimitError):  # the openai client's view of it
            ask(tiny.client(), QUESTION, max_tokens=4)
    finally:
        running.close()  # hanging up cancels the long answer: the waiting request goes next
        waiting.join(timeout=60)
    body = queued["response"].json()
    assert queued["response"].status_code == 200 and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8
    tiny.wait_idle()
    # greedy, as every other request here: sampled without a seed, the tiny model may end its answer early (a fresh
    # clone's suite once saw 3 tokens)
    assert ask(tiny.client(), QUESTION, temperature=0, max_tokens=4).usage.completion_tokens == 4


def test_a_client_that_disconnects_mid_stream_cancels_its_generation(tiny, tiny_model_dir):
    tiny.wait_idle()
    before = tiny.health()["cancelled"]
    body = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": LONG, "stream": True}
    with httpx2.stream("POST", f"{tiny.url}/v1/chat/completions", headers=tiny.headers(), json=body,
                       timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _, line in zip(range(LONG), lines):  # read until the first content arrives, then hang up
            if '"content"' in line:
                break
    tiny.wait_health(lambda h: h["cancelled"] == before + 1, "the generation cancelled")
    tiny.wait_idle()
    # A client gone while its request was still waiting in the queue: dropped before it starts.
    running = tiny.client().chat.completions.create(model=tiny_model_dir.name, stream=True, max_tokens=LONG,
                                                    temperature=0, messages=[{"role": "user", "content": QUESTION}])
    try:
        next(iter(running))
        with pytest.raises(httpx2.TimeoutException):
            tiny.post({**body, "stream": False}, timeout=0.5)  # waits behind `running`, gives up first
        tiny.wait_health(lambda h: h["waiting"] == 1 and h["cancelled"] == before + 1, "the dropped request queued")
    finally:
        running.close()
    tiny.wait_health(lambda h: h["cancelled"] == before + 3, "both later requests cancelled")
    tiny.wait_idle()


LONG_PROMPT = "我最近很焦虑，晚上睡不着，白天也没有精神。" * 200


# One of each kind of refusal, through the server: the checks themselves are unit-tested in test_server.py.
@pytest.mark.parametrize("body, status, param, words", [
    (b"{not json", 400, None, "not valid JSON"),  # the body
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature", "from 0 to 2"),  # a field
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}, 404, "model", "not served here"),
    # The prompt is measured by the worker, where it is rendered: still refused before any event.
    ({"messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 16}, 400, "messages", "the context allows"),
])
def test_bad_input_is_a_4xx_in_openai_shape_streaming_or_not(tiny, body, status, param, words):
    for sent in [body] if isinstance(body, bytes) else [body, {**body, "stream": True}]:
        error = is_openai_error(tiny.post(sent), status)  # a plain JSON error, not a broken stream
        assert words in error["message"] and error["param"] == param


def test_tiny_temperatures_are_greedy_and_off_values_of_unsupported_fields_are_accepted(tiny):
    client = tiny.client()
    greedy = ask(client, QUESTION, temperature=0, max_tokens=12)
    tiny_t = ask(client, QUESTION, temperature=1e-300, max_tokens=12, top_p=0)  # was a 500 (NaN probabilities)
    assert tiny_t.choices[0].message.content == greedy.choices[0].message.content
    off = ask(client, QUESTION, temperature=0, max_tokens=12, presence_penalty=0, frequency_penalty=0, logprobs=False,
              tools=[])
    assert off.choices[0].message.content == greedy.choices[0].message.content


def test_the_developer_role_is_a_system_message(tiny):
    client = tiny.client()
    as_system, as_developer = (client.chat.completions.create(model=served(client), temperature=0, max_tokens=8, messages=[
        {"role": role, "content": "hi"}, {"role": "user", "content": QUESTION}]) for role in ("system", "developer"))
    assert as_developer.usage.prompt_tokens == as_system.usage.prompt_tokens
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content


def resident_mb(pid: int) -> float:
    """A process's resident memory (VmRSS), in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def test_bodies_over_the_limit_are_413_before_they_are_read(tiny):
    big = {"messages": [{"role": "user", "content": "x" * MAX_BYTES}]}
    error = is_openai_error(tiny.post(big), 413)  # Content-Length says it all
    assert "--max-request-bytes" in error["message"] and error["code"] == "request_too_large"
    # 20 MB announced by Content-Length: answered before the body is read (the first connection never sends it);
    # and sent whole by a client that does not wait for the answer, it costs the server no memory (it is never read,
    # let alone parsed).
    rss = resident_mb(tiny.proc.pid)
    for send_body in (False, True):
        with socket.create_connection(("127.0.0.1", tiny.port), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 20000000\r\n\r\n{")
            if send_body:
                try:
                    s.sendall(b'"messages": [{"role": "user", "content": "' + b"x" * 20_000_000)
                except OSError:  # the server answered and closed while the body was still being sent
                    pass
            assert s.recv(4096).startswith(b"HTTP/1.1 413 ")
    assert resident_mb(tiny.proc.pid) - rss < 10
    # Chunked, without a length: refused at the chunk that crosses the limit.
    chunks = (b'{"messages": [{"role": "user", "content": "' if i == 0 else b"y" * 4096 for i in range(40))
    response = httpx2.post(f"{tiny.url}/v1/chat/completions", content=chunks, timeout=30,
                           headers={"Content-Type": "application/json", **tiny.headers()})
    is_openai_error(response, 413)
    assert ask(tiny.client(), QUESTION, max_tokens=2).usage.completion_tokens == 2


def test_a_client_that_leaves_mid_body_is_one_line_in_the_log(tiny):
    with socket.create_connection(("127.0.0.1", tiny.port), timeout=10) as s:
        # `Expect: 100-continue`: the server says "100 Continue" when the handler asks for the body, so the
        # connection goes while the handler is reading it (not before the request reached it)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 100 ")
        s.sendall(b"{\"messages\"")
    for _ in range(50):
        if "before its request body was complete" in tiny.output():
            break
        time.sleep(POLL)
    assert "before its request body was complete" in tiny.output()
    assert "Traceback" not in tiny.output()


def test_errors_reach_the_openai_client_and_the_server_goes_on(tiny):
    client = tiny.client()
    with pytest.raises(openai.BadRequestError, match="unknown role"):
        client.chat.completions.create(model=served(client), messages=[{"role": "tool", "content": "x"}])
    for path, status in (("/v1/nothing", 404), ("/nothing", 404)):
        is_openai_error(httpx2.get(tiny.url + path, headers=tiny.headers(), timeout=10), status)
    is_openai_error(httpx2.get(f"{tiny.url}/v1/chat/completions", headers=tiny.headers(), timeout=10), 405)
    assert tiny.proc.poll() is None and tiny.health()["status"] == "ok"
    assert "Traceback" not in tiny.output()
    assert ask(client, QUESTION, max_tokens=4).choices[0].message.content is not None


# ---------------------------------------------------------------- batching

def stream_concurrently(client, requests: list[dict]) -> list[dict]:
    """Start one streaming request per thread; each gets its text, and when its first text and its end arrived."""
    events = [{} for _ in requests]

    def streaming(i):
        text = []
        for chunk in ask(client, stream=True, **requests[i]):
            if chunk.choices and chunk.choices[0].delta.content:
                events[i].setdefault("first_text", time.monotonic())
                text.append(chunk.choices[0].delta.content)
            if chunk.choices and chunk.choices[0].finish_reason:
                events[i]["finish_reason"] = chunk.choices[0].finish_reason
        events[i].update(end=time.monotonic(), text="".join(text))

    threads = [threading.Thread(target=streaming, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    return events, threads


def test_concurrent_requests_decode_together_and_the_queue_beyond_the_batch(keyless):
    """--max-batch 4 --queue-size 2: four streams are decoded together (each has text before any ends), two more
    requests wait and are answered after, a seventh gets 429. (That a batched answer equals the answer alone is
    checked on the real model below and in test_decoding: this random model has near-ties that rounding flips.)"""
    client = keyless.client()
    requests = [dict(question=QUESTION, temperature=0, max_tokens=LONG // 3),
                dict(question="你好" * 40, temperature=0, max_tokens=LONG // 2),  # a longer prompt: the batch pads
                dict(question="hi", temperature=1.5, top_p=0.9, seed=11, max_tokens=LONG // 4),
                dict(question=QUESTION, temperature=0, max_tokens=LONG // 3, stop="never in the answer")]
    events, threads = stream_concurrently(client, requests)
    keyless.wait_health(lambda h: h["running"] == 4, "four requests decoding")
    later = [None, None]
    waiting = [threading.Thread(target=lambda i=i: later.__setitem__(
        i, ask(client, "你好", temperature=0, max_tokens=8))) for i in range(2)]
    for t in waiting:
        t.start()
    keyless.wait_health(lambda h: h["waiting"] == 2, "two requests waiting")
    refused = keyless.post({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    for t in threads + waiting:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads + waiting)
    assert is_openai_error(refused, 429)["code"] == "queue_full"
    assert max(e["first_text"] for e in events) < min(e["end"] for e in events)  # decoded together, not in turn
    assert all(e["text"] and e["finish_reason"] in ("stop", "length") for e in events)
    assert [a.usage.completion_tokens for a in later] == [8, 8]
    keyless.wait_idle()


# ---------------------------------------------------------------- keys, and the keyless server

def test_the_key_from_a_file_the_environment_or_the_flag_with_a_warning(tmp_path, capsys):
    (tmp_path / "key").write_text("  sk-file  \n")
    assert api_key_from(None, str(tmp_path / "key"), environ={API_KEY_ENV: "sk-env"}) == "sk-file"
    assert api_key_from(None, None, environ={API_KEY_ENV: "sk-env"}) == "sk-env"
    assert api_key_from(None, None, environ={API_KEY_ENV: ""}) is None and api_key_from(None, None, environ={}) is None
    assert capsys.readouterr().err == ""
    assert api_key_from("sk-flag", None, environ={API_KEY_ENV: "sk-env"}) == "sk-flag"
    assert "visible to other users" in capsys.readouterr().err
    # A bad key file: one line, exit 2, before any model is loaded.
    for content in ("", "one\ntwo\n"):
        (tmp_path / "bad").write_text(content)
        with pytest.raises(SystemExit) as e:
            chat.main(["no-such-model", "--serve", "--api-key-file", str(tmp_path / "bad")])
        assert e.value.code == 2 and "expected the API key on one line" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        chat.main(["no-such-model", "--serve", "--api-key-file", str(tmp_path / "missing")])
    assert e.value.code == 2 and "cannot read the API key" in capsys.readouterr().err


def test_a_keyless_server_refuses_web_pages_of_other_sites(keyless):
    url, body = f"{keyless.url}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    # What any web page can send without a CORS preflight: a form-like text/plain POST.
    refused = httpx2.post(url, content=json.dumps(body), headers={"Content-Type": "text/plain"}, timeout=10)
    assert is_openai_error(refused, 415)["code"] == "unsupported_media_type"
    refused = httpx2.post(url, json=body, headers={"Origin": "https://evil.example"}, timeout=10)
    assert is_openai_error(refused, 403)["code"] == "cross_origin"
    # DNS rebinding: a page's own host name resolved to 127.0.0.1.
    for host in ("evil.example", f"evil.example:{keyless.port}"):
        refused = httpx2.get(f"{keyless.url}/v1/models", headers={"Host": host}, timeout=10)
        assert is_openai_error(refused, 403)["code"] == "host_not_allowed"
    # This machine's tools and pages are served.
    for headers in ({}, {"Origin": "http://localhost:3000"}, {"Host": f"localhost:{keyless.port}"}):
        assert httpx2.post(url, json=body, headers=headers, timeout=30).status_code == 200
    assert ask(keyless.client(), QUESTION, max_tokens=2).usage.completion_tokens == 2


def test_connections_stalled_mid_request_are_closed(keyless):
    stalled = []
    try:
        for sent in (b"", b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n",
                     b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{"):
            s = socket.create_connection(("127.0.0.1", keyless.port), timeout=10)
            stalled.append(s)
            s.sendall(sent)
        for s in stalled:  # --read-timeout 1: each is closed (recv returns b"", or a reset); a socket still open
            try:  # after 10 s raises socket.timeout here and fails the test
                while s.recv(4096):  # the 499 of a body cut short may come first
                    pass
            except ConnectionResetError:
                pass
    finally:
        for s in stalled:
            s.close()
    assert "did not arrive within 1 s" in keyless.output() and "Traceback" not in keyless.output()
    assert ask(keyless.client(), QUESTION, max_tokens=2).usage.completion_tokens == 2


# ---------------------------------------------------------------- the demo model

@pytest.mark.parametrize("question, max_tokens, finish_reason", [
    ("What is the capital of France? Answer in one word.", 24, "stop"),  # ends with EOS
    ("Say hello.", 12, "length"),
])
def test_demo_model_answers_as_chat_once(demo, capsys, question, max_tokens, finish_reason):
    expected = once(capsys, DEMO_MODEL, question, max_tokens, "--torch-dtype", "float32")
    answer = ask(demo.client(), question, temperature=0, max_tokens=max_tokens)
    assert answer.choices[0].message.content == expected and expected.strip()
    assert answer.choices[0].finish_reason == finish_reason
    assert (answer.usage.completion_tokens == max_tokens) == (finish_reason == "length")
    _, deltas, last, _ = ask_streaming(demo.client(), question, temperature=0, max_tokens=max_tokens)
    assert "".join(deltas) == expected and last.choices[0].finish_reason == finish_reason
    assert answer.model == DEMO_MODEL.name


def test_demo_model_answers_under_load_as_alone(demo):
    """Greedy answers decoded together (different prompts and lengths, a stop word, a long prompt prefilled a chunk
    per step while the others decode) equal the answers alone: in
    float32 the batch's rounding does not change the real model's choices (in bfloat16 it can:
    docs/serving.md#batching-and-the-queue)."""
    client = demo.client()
    questions = ["What is the capital of France?", "Give me three tips for sleeping better.",
                 "我最近总是失眠，怎么办？", "Write a haiku about the sea."]
    requests = [dict(question=q, temperature=0, max_tokens=n) for q, n in zip(questions, (16, 32, 28, 20))]
    # A prompt of over PREFILL_CHUNK tokens, started last: it joins the others under way a chunk per step
    turns = json.loads((ROOT / "data" / "psych_sample.json").read_text(encoding="utf-8"))[0]["conversation"]
    requests.append(dict(question="用一句话总结：" + "".join(t["input"] + t["output"] for t in turns)[:300],
                         temperature=0, max_tokens=12))
    answers = [ask(client, **r) for r in requests]
    alone = [a.choices[0].message.content for a in answers]
    assert answers[-1].usage.prompt_tokens > PREFILL_CHUNK
    cut = alone[1].find(" ", len(alone[1]) // 2)
    requests.append(dict(question=questions[1], temperature=0, max_tokens=32, stop=alone[1][cut:cut + 4]))
    alone.append(alone[1][:cut])
    events, threads = stream_concurrently(client, requests)
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert [e["text"] for e in events] == alone
    assert max(e["first_text"] for e in events) < min(e["end"] for e in events)


def test_a_server_stopped_by_sigterm_exits_through_python(request, tmp_path_factory, tiny_model_dir):
    """uvicorn ends a graceful shutdown by raising the signal again under the handler it found; for SIGTERM the
    default one would end the process at once, before the worker frees the compiled step's packages (their copies
    in the temp folder: test_decode_step). The server exits through Python instead: status 128 + 15."""
    server = start(request, tmp_path_factory, tiny_model_dir)
    assert ask(server.client(), "hi", temperature=0, max_tokens=4).usage.completion_tokens == 4
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert "Finished server process" in server.output() and "Traceback" not in server.output()
