"""The OpenAI-shaped bodies of one completion: whole, or as server-sent events fed by the worker's events."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Optional

from common.generation import Completion
from common.server.worker import Finished, Job


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
