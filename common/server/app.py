"""The FastAPI app: the routes, the worker behind them, every error in OpenAI's shape (tracebacks stay in the
server's log), and serve(), which runs it under uvicorn. The one module that knows both the API and the web page."""
from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from common import webpage
from common.generation import Generator, Sampling
from common.server import HOST, MAX_BATCH, MAX_REQUEST_BYTES, PORT, PREFILL_CHUNK, QUEUE_SIZE, READ_TIMEOUT
from common.server.access import LOOPBACK, access_check
from common.server.body import ClientGone, read_body
from common.server.errors import ApiError
from common.server.request import BASE_SUFFIX, parse_request, served_models
from common.server.responses import ResponseBodies, collect, finish, stream_events
from common.server.transport import read_timeout_protocol
from common.server.worker import Finished, Job, Worker


def create_app(worker: Worker, model: str, defaults: Sampling, system: Optional[str] = None,
               api_key: Optional[str] = None, max_request_bytes: int = MAX_REQUEST_BYTES,
               host: str = HOST, source=None) -> FastAPI:
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
        webpage.add_routes(app, check, webpage.Page.of(source, model, served, defaults, system, worker.generator))
    return app


async def cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client goes away. After the body is read, the server's receive() returns only on a
    disconnect, or once the response is complete (when cancelling a finished job does nothing)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's body shape, including the framework's own (404, 405) and unexpected ones (500)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, e: ClientGone):  # one line for the operator; the response goes nowhere
        client = request.client
        print(f"{client.host}:{client.port} - the client closed the connection before its request body was complete"
              if client else "a client closed the connection before its request body was complete",
              file=sys.stderr, flush=True)
        return error_response(ApiError(499, "the client closed the request", code="client_closed"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return error_response(ApiError(e.status_code, str(e.detail),
                                       code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):  # uvicorn logs the traceback; the client gets one line
        return error_response(ApiError(500, f"internal error: {type(e).__name__}", type="server_error"))


def model_id(source) -> str:
    """A readable id: the run's name for a model from one of our runs, else the model directory's name (with the
    adapter's, when one is loaded on it)."""
    if source.run_dir is not None:
        return source.run_dir.name
    name = Path(source.model).name
    return f"{name}+{Path(source.adapter).name}" if source.adapter else name


def serve(generator: Generator, sampling: Sampling, system: Optional[str], source, host: str = HOST,
          port: int = PORT, api_key: Optional[str] = None, queue_size: int = QUEUE_SIZE,
          max_request_bytes: int = MAX_REQUEST_BYTES, read_timeout: float = READ_TIMEOUT,
          max_batch: int = MAX_BATCH, prefill_chunk: int = PREFILL_CHUNK) -> None:
    """Serve until Ctrl-C (SIGINT) or SIGTERM."""
    model = model_id(source)
    worker = Worker(generator, queue_size, max_batch, prefill_chunk)
    app = create_app(worker, model, sampling, system, api_key, max_request_bytes, host, source)
    base = f" (and its base, {model}{BASE_SUFFIX})" if source.adapter is not None else ""
    print(f"serving {model}{base} at http://{host}:{port}/v1 | web page http://{host}:{port}/ | template "
          f"{generator.template.name} | context {generator.max_length} tokens | up to {max_batch} request(s) at a "
          f"time, {queue_size} waiting"
          + ("" if api_key else " | no API key"), file=sys.stderr, flush=True)
    if api_key is None and host not in LOOPBACK:
        print(f"warning: listening on {host} without an API key: anyone who can reach this port can use the model",
              file=sys.stderr, flush=True)
    # uvicorn ends its graceful shutdown by raising the signal again under the handler it found: for SIGTERM the
    # default one, which ends the process at once, before the worker below is closed. This one exits through Python.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        # A bounded graceful shutdown: requests still open after it are cancelled, and with them their generation.
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=3,
                    http=read_timeout_protocol(read_timeout))
    finally:
        worker.close()
