"""`chat.py --serve`: the model behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

    POST /v1/chat/completions   (stream: true for server-sent events)
    GET  /v1/models             the served model; an adapter run also lists its base, `ID:base` (the adapter off)
    GET  /health                {"status", "model", "running", "waiting", "cancelled"}
    GET  /                      the web page (common/webpage.py: chat, base vs tuned, the run)

One worker thread runs the model (a model and its tokenizer are not thread-safe): up to --max-batch requests decode
together, one token each per forward (continuous batching: a request joins between steps and leaves when it ends),
more wait in a bounded queue; the text it produces is handed to the event loop with call_soon_threadsafe. A client
that disconnects cancels its generation at the next token. Every error reaches the client in OpenAI's shape,
{"error": {"message", "type", "param", "code"}}; tracebacks stay in the server's log. Hostile input is refused before it costs anything: bodies over a size limit (413, unread), invalid UTF-8, deep
nesting, lone surrogates; a keyless server refuses other sites' web pages (access_check), and a request that does not
arrive in time is disconnected (read_timeout_protocol).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import queue
import secrets
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from common.cli import UserError, first_line, reading
from common.conversation import OPENAI_ROLES, BadRecord, messages_to_turns
from common.generation import Answering, Completion, Generator, PromptTooLong, Sampling, no_room

SEED_LIMIT = 2 ** 63  # torch.manual_seed takes 64-bit seeds; OpenAI's seed is a non-negative integer
MAX_DEPTH = 32  # nesting of the body's JSON: a chat request needs 4 (body, messages, message, content part)
API_KEY_ENV = "SFT_API_KEY"  # the key from the environment: unlike --api-key, not shown by `ps` to other users
READ_TIMEOUT = 30  # --read-timeout's default: seconds a client has to send a whole request, headers and body
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
WILDCARD = {"0.0.0.0", "::", ""}  # every interface: no one name the server is addressed by
BASE_SUFFIX = ":base"  # the model id that asks an adapter run's base: the same load with the adapter switched off
MAX_REQUEST_BYTES = 1 << 20  # --max-request-bytes' default: 1 MiB is far more text than a 32k-token context holds
ROLES = {**OPENAI_ROLES, "developer": "system"}  # `developer`: OpenAI's newer name for the system message
# OpenAI fields this server does not implement: refused by name rather than silently ignored, when set to anything
# but their "off" value (null, false, 0, an empty list or object).
UNSUPPORTED = {
    "tools": "tool calls are not implemented", "tool_choice": "tool calls are not implemented",
    "functions": "function calls are not implemented", "function_call": "function calls are not implemented",
    "logprobs": "log probabilities are not returned", "top_logprobs": "log probabilities are not returned",
    "presence_penalty": "no presence penalty is applied (send 0)",
    "frequency_penalty": "no frequency penalty is applied (send 0)",
    "logit_bias": "logit bias is not applied",
}


# ---------------------------------------------------------------- errors

class ApiError(Exception):
    """An error for the client, in OpenAI's vocabulary."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param=param)


# ---------------------------------------------------------------- the request

@dataclass
class ChatRequest:
    messages: list[dict]  # as the model sees them: the server's system prompt added when the client sent none
    sampling: Sampling
    stop: list[str]  # added to the template's stop words for this request
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts
    adapter: bool = True  # False: the base answers (`model` was ID:base), the adapter switched off


def parse_request(body: bytes, defaults: Sampling, system: Optional[str] = None,
                  context: Optional[int] = None, models: Optional[dict[str, bool]] = None) -> ChatRequest:
    """The request body -> what to generate, or an ApiError (400) that names the offending field. `context`: the
    model's context in tokens, which max_tokens must leave room in. `models`: the ids served, each with whether its
    adapter is on (served_models); a request without `model` asks the served model, one with another id is a 404."""
    data = json_object(body)
    for name, why in UNSUPPORTED.items():
        if data.get(name) not in (None, False, 0, [], {}):
            raise bad_request(f"`{name}` is not supported by this server: {why}", name)
    adapter = model_adapter(data.get("model"), models)
    messages = parse_messages(data.get("messages"))
    if integer(data, "n", minimum=1) not in (None, 1):
        raise bad_request("n > 1 is not supported: the server gives one answer per request", "n")
    max_tokens = integer(data, "max_completion_tokens", minimum=1) or integer(data, "max_tokens", minimum=1)
    problem = no_room(max_tokens, context, "max_tokens") if max_tokens else None
    if problem:
        raise bad_request(problem, "max_tokens")
    sampling = dataclasses.replace(defaults, **{k: v for k, v in {
        "max_new_tokens": max_tokens,
        "temperature": number(data, "temperature", 0, 2),
        "top_p": number(data, "top_p", 0, 1),
        "seed": integer(data, "seed", minimum=0, limit=SEED_LIMIT),
    }.items() if v is not None})
    stream = flag(data, "stream")
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request(f"`stream_options` must be an object, got {json_type(options)}", "stream_options")
    include_usage = stream and flag(options or {}, "include_usage", "stream_options.include_usage")
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}] + messages
    return ChatRequest(messages, sampling, stop_words(data.get("stop")), stream, include_usage, adapter)


def served_models(model: str, adapter: bool) -> dict[str, bool]:
    """The ids /v1/models lists, each with whether the adapter is on: the served model, and for an adapter run its
    base (BASE_SUFFIX), answered by the same load with the adapter switched off."""
    return {model: True, **({model + BASE_SUFFIX: False} if adapter else {})}


def model_adapter(model, models: Optional[dict[str, bool]]) -> bool:
    """Whether the request's `model` has the adapter on; an id that is not served is a 404, as OpenAI answers."""
    if model is None or models is None:
        return True
    if not isinstance(model, str) or model not in models:
        raise ApiError(404, f"the model {json.dumps(model, ensure_ascii=False)} is not served here: use one of "
                            f"{', '.join(models)} (GET /v1/models)", param="model", code="model_not_found")
    return models[model]


def json_object(body: bytes) -> dict:
    """A request body -> its JSON object, or a 400 saying what is wrong with it (check_values: depth, surrogates)."""
    try:
        text = body.decode("utf-8")  # strict: JSON is UTF-8, and json.loads(bytes) would let encoded surrogates in
    except UnicodeDecodeError as e:
        raise bad_request(f"the body is not valid UTF-8: {e.reason} at byte {e.start}") from None
    try:
        data = json.loads(text)
    except RecursionError:  # the decoder recurses per level: thousands of [ end it there, cheaply
        raise bad_request(f"the body is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:
        raise bad_request(f"the body is not valid JSON: {e}") from None
    check_values(data)
    if not isinstance(data, dict):
        raise bad_request(f"the body must be a JSON object, got {json_type(data)}")
    return data


def parse_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("`messages` must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    try:
        # Roles, string contents and a last user message to answer: the same rules the generation core applies,
        # checked here so that a bad conversation is refused before it waits in the queue.
        messages_to_turns(messages, open_end=True, roles=ROLES)
    except BadRecord as e:
        raise bad_request(str(e), "messages") from None
    return [{**m, "role": ROLES[m["role"]]} for m in messages]


def check_values(data) -> None:
    """Refuse what a tokenizer or a later json.dumps would fail on, naming where it is: nesting beyond MAX_DEPTH,
    and strings holding a lone surrogate (JSON's "\\ud800" escapes decode to one; UTF-8 cannot encode it)."""
    pending = [(data, "the body", 0, None)]  # (value, where it is, its depth, the top-level field holding it)
    while pending:  # a loop, not recursion: the depth is what is being checked
        value, where, depth, param = pending.pop()
        if depth > MAX_DEPTH:
            raise bad_request(f"the body is nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise bad_request(f"{where}: a lone surrogate (\\u{ord(value[e.start]):04x}) at character {e.start} "
                                  "is not text", param) from None
        elif isinstance(value, dict):
            for k, v in value.items():
                field = param or k
                pending += [(k, f"a key of {where}", depth + 1, param),  # error messages may quote keys
                            (v, k if depth == 0 else f"{where}.{k}", depth + 1, field)]
        elif isinstance(value, list):
            pending += [(v, f"{where}[{i}]", depth + 1, param) for i, v in enumerate(value)]


def json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def number(data: dict, name: str, low: float, high: float) -> Optional[float]:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise bad_request(f"`{name}` must be a number from {low} to {high}, got {json.dumps(value)}", name)
    return float(value)


def integer(data: dict, name: str, minimum: int, limit: Optional[int] = None) -> Optional[int]:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (limit and value >= limit):
        bound = f"from {minimum} to {limit - 1}" if limit else f"of at least {minimum}"
        raise bad_request(f"`{name}` must be an integer {bound}, got {json.dumps(value)}", name)
    return value


def flag(data: dict, name: str, param: Optional[str] = None) -> bool:
    value = data.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"`{param or name}` must be true or false, got {json.dumps(value)}", param or name)
    return value


def stop_words(stop) -> list[str]:
    if stop is None:
        return []
    words = [stop] if isinstance(stop, str) else stop
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise bad_request(f"`stop` must be a string or a list of strings, got {json.dumps(stop)}", "stop")
    return words


# ---------------------------------------------------------------- the worker

@dataclass
class Started:
    """The prompt fits: generation begins (a streaming response may now be sent)."""


@dataclass
class Finished:
    completion: Optional[Completion] = None  # None: refused (error), or dropped because its client had gone
    error: Optional[ApiError] = None


class Job:
    """One request's generation, and the channel (an asyncio queue) its events take back to the event loop:
    Started, then text chunks (str), then Finished. Nothing else is sent after an error or a drop."""

    def __init__(self, request: ChatRequest, loop: asyncio.AbstractEventLoop):
        self.request, self.loop = request, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()

    def post(self, event) -> None:
        """From the worker thread: asyncio queues are not thread-safe, so the loop's own thread does the put."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop has closed: the server is shutting down, nobody is listening
            pass

    def cancel(self) -> None:
        self._cancelled.set()

    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Worker:
    """The one thread that touches the model. Up to `max_batch` requests generate together, one token each per step
    of a decoding.Decoder (one forward for all of them): a request joins at the next step after it arrives and leaves
    when it ends, so a short answer does not wait for a long one. Up to `queue_size` more wait; beyond that, 429.
    Requests for the base model (the adapter off) decode in a second batch, stepped in turn with the first: one
    forward cannot switch a PEFT adapter per row."""

    def __init__(self, generator: Generator, queue_size: int, max_batch: int):
        self.generator, self.queue_size, self.max_batch = generator, queue_size, max_batch
        self.jobs: queue.Queue[Job] = queue.Queue()
        # Accepted and not yet finished, counted here rather than by the queue's own bound: a job the worker has not
        # picked up yet would otherwise take a waiting place on an idle server.
        self.pending, self.lock = 0, threading.Lock()
        self.cancelled = 0  # jobs stopped, or never started, because their client went away
        self.decoders = {adapter: generator.decoder(adapter) for adapter in (True, False)}  # by ChatRequest.adapter
        self.answering: dict[int, tuple[Job, Answering]] = {}  # id(row) -> its job and answer, for the rows decoding
        threading.Thread(target=self._run, name="generation", daemon=True).start()

    @property
    def running(self) -> int:
        return min(self.pending, self.max_batch)

    @property
    def waiting(self) -> int:
        return max(self.pending - self.max_batch, 0)

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.pending >= self.max_batch + self.queue_size:
                raise ApiError(429, f"the server is busy: {self.queue_size} request(s) already waiting for the model; "
                                    "retry later", type="rate_limit_error", code="queue_full")
            self.pending += 1
        self.jobs.put(job)

    def _run(self) -> None:
        while True:
            self._admit()
            self._step()

    def _admit(self) -> None:
        """Start waiting jobs while the batch has room; wait for one when nothing is decoding."""
        while len(self.answering) < self.max_batch:
            try:
                job = self.jobs.get(block=not self.answering)
            except queue.Empty:
                return
            self._start(job)

    def _start(self, job: Job) -> None:
        if job.cancelled():
            self.cancelled += 1
            return self._done(job, Finished())
        request = job.request
        try:
            # The prompt is rendered and checked before Started, so that a prompt too long is a 400, not a broken
            # stream; the prefill then picks the first token.
            answering = self.generator.start(request.messages, request.sampling, on_text=job.post,
                                             cancelled=job.cancelled, stop=request.stop)
            job.post(Started())
            ended = self.decoders[request.adapter].add(answering.row)
        except PromptTooLong as e:  # OpenAI's code for it: a client (the web page) drops old turns and retries
            return self._done(job, Finished(error=ApiError(400, str(e), param="messages",
                                                           code="context_length_exceeded")))
        except UserError as e:  # BadMessages
            return self._done(job, Finished(error=bad_request(str(e), "messages")))
        except Exception as e:
            return self._done(job, crashed(e))
        if ended:
            return self._finish(job, answering)
        self.answering[id(answering.row)] = (job, answering)

    def _step(self) -> None:
        for decoder in self.decoders.values():
            rows = list(decoder.rows)
            try:
                ended = decoder.step()
            except Exception as e:  # the decoder has dropped every row: each of their requests gets the error
                error = crashed(e)
                for row in rows:
                    self._done(self.answering.pop(id(row))[0], error)
                continue
            for row in ended:
                self._finish(*self.answering.pop(id(row)))

    def _finish(self, job: Job, answering: Answering) -> None:
        completion = answering.completion()
        if completion.ended_by == "cancelled":
            self.cancelled += 1
        self._done(job, Finished(completion))

    def _done(self, job: Job, event: Finished) -> None:
        job.post(event)
        with self.lock:
            self.pending -= 1


def crashed(e: Exception) -> Finished:
    traceback.print_exc()  # for the operator; the client gets one line and the server goes on
    return Finished(error=ApiError(500, f"generation failed: {type(e).__name__}: {first_line(e)}", type="server_error"))


class ClientGone(Exception):
    """The client closed the connection before its request body was complete: nobody to answer."""


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes: by its Content-Length before any
    of it is read, else (chunked) at the chunk that crosses it. Nothing over the limit is kept, parsed or tokenized."""
    too_big = ApiError(413, f"the request body is larger than the server's limit of {limit} bytes "
                            "(chat.py --max-request-bytes)", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    return b"".join(chunks)


async def cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client goes away. After the body is read, the server's receive() returns only on a
    disconnect, or once the response is complete (when cancelling a finished job does nothing)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


# ---------------------------------------------------------------- responses

class ResponseBodies:
    """The OpenAI-shaped bodies of one completion (whole, or as stream chunks)."""

    def __init__(self, model: str):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    @staticmethod
    def usage(completion: Completion) -> dict:
        return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
                "total_tokens": completion.prompt_tokens + completion.completion_tokens}

    def whole(self, completion: Completion) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": completion.text},
                  "finish_reason": completion.finish_reason, "logprobs": None}
        return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage(completion)}

    def chunk(self, delta: dict, finish_reason: Optional[str] = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return sse({**self._head("chat.completion.chunk"), "choices": [choice]})

    def usage_chunk(self, completion: Completion) -> str:
        return sse({**self._head("chat.completion.chunk"), "choices": [], "usage": self.usage(completion)})


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_events(job: Job, watcher: asyncio.Task, bodies: ResponseBodies):
    """The server-sent events of a started job: role, content deltas, finish_reason, [usage], [DONE]."""
    try:
        yield bodies.chunk({"role": "assistant"})
        while isinstance(event := await job.events.get(), str):
            yield bodies.chunk({"content": event})
        if event.error is not None:  # a crash mid-answer: the status line has gone, so the error goes in the stream
            yield sse(event.error.body())
            return
        completion = event.completion
        if completion is None or completion.ended_by == "cancelled":
            return  # the client has gone
        yield bodies.chunk({}, completion.finish_reason)
        if job.request.include_usage:
            yield bodies.usage_chunk(completion)
        yield "data: [DONE]\n\n"
    finally:
        finish(job, watcher)


async def collect(job: Job) -> Finished:
    while not isinstance(event := await job.events.get(), Finished):
        pass  # the text chunks: the completion carries the whole text
    return event


def finish(job: Job, watcher: asyncio.Task) -> None:
    """The handler is done with the job, normally or not (an exception, a cancelled task): no more tokens."""
    job.cancel()
    watcher.cancel()


# ---------------------------------------------------------------- the app

def create_app(worker: Worker, model: str, defaults: Sampling, system: Optional[str] = None,
               api_key: Optional[str] = None, max_request_bytes: int = MAX_REQUEST_BYTES,
               host: str = "127.0.0.1", source=None) -> FastAPI:
    """The API, and the web page when `source` (the artifacts.ModelSource served) is given; an adapter in it makes
    the base servable too (served_models)."""
    # No /docs or /openapi.json: they would be reachable without the key and describe nothing a client needs.
    app = FastAPI(title="chat.py --serve", docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)
    check = access_check(api_key, host)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check)])
    created = int(time.time())
    served = served_models(model, source is not None and source.adapter is not None)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model, "running": worker.running, "waiting": worker.waiting,
                "cancelled": worker.cancelled}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "local"}
                                           for name in served]}

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request, max_request_bytes)
        chat = parse_request(body, defaults, system, worker.generator.max_length, served)
        job = Job(chat, asyncio.get_running_loop())
        worker.submit(job)
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        try:
            first = await job.events.get()  # Started, or Finished: refused, or dropped after its client left
            if isinstance(first, Finished):
                raise first.error or ApiError(499, "the client closed the request", code="client_closed")
            bodies = ResponseBodies(model)
            if chat.stream:
                headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of events
                return StreamingResponse(stream_events(job, watcher, bodies), media_type="text/event-stream",
                                         headers=headers)
            finished = await collect(job)
        except BaseException:
            finish(job, watcher)
            raise
        finish(job, watcher)
        if finished.error is not None:
            raise finished.error
        return bodies.whole(finished.completion)

    app.include_router(v1)
    if source is not None:
        from common import webpage

        webpage.add_routes(app, check, webpage.Page.of(source, model, served, defaults, system, worker.generator))
    return app


def access_check(api_key: Optional[str], host: str):
    """A dependency for the /v1 routes: `Authorization: Bearer KEY` when the server has a key, else the checks that
    keep web pages out (as Ollama and Jupyter do). Any page the user opens may POST to 127.0.0.1 without a CORS
    preflight, if the request looks like a form (text/plain, no custom header), and a DNS-rebinding page may reach it
    under its own host name. So a keyless server answers only requests addressed to its own name (`Host`), from no
    page or a page of this machine (`Origin`), and POSTs only as application/json, which browsers do not send
    cross-site without a preflight that this server does not grant."""
    names = None if host in WILDCARD else LOOPBACK | {host.strip("[]").lower()}

    async def check(request: Request) -> None:
        if api_key is None:
            return same_site(request, names)
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "missing API key: send the header `Authorization: Bearer KEY`", code="invalid_api_key")
        if not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    return check


def same_site(request: Request, names: Optional[set[str]]) -> None:
    """The keyless server's checks (access_check); `names`: the host names it answers to, None for any."""
    addressed = urlsplit("//" + request.headers.get("host", "")).hostname or ""
    if names is not None and addressed not in names:
        raise ApiError(403, f"the request is addressed to host `{addressed}`, not to this server's address "
                            "(a keyless server answers only its own; set an API key to serve other names)",
                       type="permission_error", code="host_not_allowed")
    origin = request.headers.get("origin")
    if origin is not None and (urlsplit(origin).hostname or "") not in (names or {addressed}) | LOOPBACK:
        raise ApiError(403, f"cross-origin request from `{origin}` refused: a keyless server answers no web page "
                            "but this machine's (set an API key to allow others)",
                       type="permission_error", code="cross_origin")
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if request.method == "POST" and media != "application/json":
        raise ApiError(415, f"the body must be sent as `Content-Type: application/json`, not `{media or 'nothing'}`",
                       code="unsupported_media_type")


def api_key_from(flag: Optional[str], file: Optional[str], environ=os.environ) -> Optional[str]:
    """The key from --api-key, --api-key-file or $SFT_API_KEY (in that order; None: serve without a key). The flag
    still works but is visible to every user of the machine, in `ps` and /proc/PID/cmdline."""
    if flag is not None:
        print(f"warning: --api-key is visible to other users of this machine (ps, /proc/PID/cmdline): use "
              f"--api-key-file PATH or ${API_KEY_ENV} instead", file=sys.stderr, flush=True)
        return flag
    if file is not None:
        with reading(file, "cannot read the API key"):
            lines = Path(file).read_text(encoding="utf-8").strip().splitlines()
        if len(lines) != 1 or not lines[0].strip():
            raise UserError(f"{file}: expected the API key on one line, found {len(lines)} lines")
        return lines[0].strip()
    return environ.get(API_KEY_ENV) or None


def read_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol with a deadline for each request to arrive whole, headers and body: uvicorn 0.54 has
    only a keep-alive timeout, between requests, so a client that stalls mid-headers (or mid-body) would hold its
    connection forever. The deadline is not moved by more data, so dribbling a byte at a time does not extend it."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class ReadTimeoutH11Protocol(H11Protocol):
        deadline: Optional[asyncio.TimerHandle] = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def connection_lost(self, exc) -> None:
            self._stop_watching()
            super().connection_lost(exc)

        def _watch(self) -> None:
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                if self.deadline is None:  # the deadline of the request under way: not moved by more bytes
                    self.deadline = self.loop.call_later(seconds, self._expired)
            else:
                self._stop_watching()

        def _stop_watching(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def _expired(self) -> None:
            self.deadline = None
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                where = "%s:%d - " % self.client if self.client else ""
                self.logger.info(f"{where}closed: the request did not arrive within {seconds:g} s")
                self.transport.close()

    return ReadTimeoutH11Protocol


def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's body shape, including the framework's own (404, 405) and unexpected ones (500)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, e: ClientGone):  # one line for the operator; the response goes nowhere
        client = request.client
        print(f"{client.host}:{client.port} - the client closed the connection before its request body was complete"
              if client else "a client closed the connection before its request body was complete",
              file=sys.stderr, flush=True)
        return ApiError(499, "the client closed the request", code="client_closed").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):  # uvicorn logs the traceback; the client gets one line
        return ApiError(500, f"internal error: {type(e).__name__}", type="server_error").response()


# ---------------------------------------------------------------- serve

def model_id(source) -> str:
    """A readable id: the run's name for a model from one of our runs, else the model directory's name (with the
    adapter's, when one is loaded on it)."""
    if source.run_dir is not None:
        return source.run_dir.name
    name = Path(source.model).name
    return f"{name}+{Path(source.adapter).name}" if source.adapter else name


def serve(generator: Generator, sampling: Sampling, system: Optional[str], source, host: str = "127.0.0.1",
          port: int = 8000, api_key: Optional[str] = None, queue_size: int = 16,
          max_request_bytes: Optional[int] = None, read_timeout: Optional[float] = None, max_batch: int = 8) -> None:
    """Serve until Ctrl-C (SIGINT) or SIGTERM."""
    import uvicorn

    model = model_id(source)
    app = create_app(Worker(generator, queue_size, max_batch), model, sampling, system, api_key,
                     max_request_bytes or MAX_REQUEST_BYTES, host, source)
    base = f" (and its base, {model}{BASE_SUFFIX})" if source.adapter is not None else ""
    print(f"serving {model}{base} at http://{host}:{port}/v1 | web page http://{host}:{port}/ | template "
          f"{generator.template.name} | context {generator.max_length} tokens | up to {max_batch} request(s) at a "
          f"time, {queue_size} waiting"
          + ("" if api_key else " | no API key"), file=sys.stderr, flush=True)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host} without an API key: anyone who can reach this port can use the model",
              file=sys.stderr, flush=True)
    # A bounded graceful shutdown: requests still open after it are cancelled, and with them their generation.
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=3,
                http=read_timeout_protocol(read_timeout or READ_TIMEOUT))
