"""The one thread that runs the model (a model and its tokenizer are not thread-safe). Up to --max-batch requests
decode together, one token each per forward (continuous batching: a request joins between steps and leaves when it
ends); more wait in a bounded queue. The text it produces goes back to the event loop with call_soon_threadsafe, and
a request whose client has gone is cancelled at its next token. No web framework here: jobs in, events out."""
from __future__ import annotations

import asyncio
import queue
import threading
import traceback
from dataclasses import dataclass
from typing import Optional

from common.cli import UserError, first_line
from common.decoding import Decoder
from common.generation import Answering, Completion, Generator, PromptTooLong
from common.server import GATHER, PREFILL_CHUNK
from common.server.errors import ApiError, bad_request
from common.server.request import ChatRequest


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
    of a decoding.Decoder (one forward for all of them): a request joins at the next step after it arrives (those that
    arrive together prefilled in one forward) and leaves when it ends, so a short answer does not wait for a long one;
    a prompt longer than `prefill_chunk` tokens that joins rows under way is prefilled that many positions per step,
    so the others' answers go on meanwhile. Up to `queue_size` more wait; beyond that, 429.
    Requests for the base model (the adapter off) decode in a second batch, stepped in turn with the first: one
    forward cannot switch a PEFT adapter per row."""

    def __init__(self, generator: Generator, queue_size: int, max_batch: int, prefill_chunk: int = PREFILL_CHUNK,
                 gather: float = GATHER):
        self.generator, self.queue_size, self.max_batch = generator, queue_size, max_batch
        self.prefill_chunk = prefill_chunk  # 0: each prompt prefilled whole as it joins
        self.gather = gather  # seconds an idle worker waits for the next of requests arriving together (0: none)
        self.jobs: queue.Queue[Job] = queue.Queue()
        # Accepted and not yet finished, counted here rather than by the queue's own bound: a job the worker has not
        # picked up yet would otherwise take a waiting place on an idle server.
        self.pending, self.lock = 0, threading.Lock()
        self.cancelled = 0  # jobs stopped, or never started, because their client went away
        self.decoders = {adapter: generator.decoder(adapter) for adapter in (True, False)}  # by ChatRequest.adapter
        self.answering: dict[int, tuple[Job, Answering]] = {}  # id(row) -> its job and answer, for the rows decoding
        self.busy, self.closed = threading.Lock(), False  # held while the model is in use; closed: not again
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
            jobs = self._arrived()
            with self.busy:  # the model is in use only inside: close() waits for it
                if self.closed:
                    return
                self._admit(jobs)
                self._step()

    def close(self, timeout: float = 10) -> None:
        """Stop using the model once the step under way is over (waiting at most `timeout` seconds), and free the
        compiled decode step's packages (their copies in the temp folder). For the server's exit."""
        if not self.busy.acquire(timeout=timeout):
            return  # a step still running: it keeps its packages, and the copies stay behind
        try:
            self.closed = True
            if self.generator.fast is not None:
                self.generator.fast.release()
        finally:
            self.busy.release()

    def _arrived(self) -> list[Job]:
        """The waiting jobs the batch has room for. When nothing is decoding: wait for one, then take those that
        follow it within `gather` seconds of each other."""
        jobs, idle = [], not self.answering
        while len(self.answering) + len(jobs) < self.max_batch:
            try:
                jobs.append(self.jobs.get(block=idle, timeout=self.gather if jobs else None))
            except queue.Empty:
                break
        return jobs

    def _admit(self, jobs: list[Job]) -> None:
        """Start these jobs, those that came in together prefilled together."""
        starting = {adapter: [] for adapter in self.decoders}  # (job, answering) by ChatRequest.adapter
        for job in jobs:
            started = self._started(job)
            if started is not None:
                starting[job.request.adapter].append((job, started))
        for adapter, started in starting.items():
            if started:
                self._join(self.decoders[adapter], started)

    def _started(self, job: Job) -> Optional[Answering]:
        """The job's answer ready to decode, or None where it is done already (cancelled, or a bad request)."""
        if job.cancelled():
            self.cancelled += 1
            return self._done(job, Finished())
        request = job.request
        try:
            # The prompt is rendered and checked before Started, so that a prompt too long is a 400, not a broken
            # stream; the prefill then picks the first token.
            answering = self.generator.start(request.messages, request.sampling, on_text=job.post,
                                             cancelled=job.cancelled, stop=request.stop, switches=request.switches)
        except PromptTooLong as e:  # OpenAI's code for it: a client (the web page) drops old turns and retries
            return self._done(job, Finished(error=ApiError(400, str(e), param="messages",
                                                           code="context_length_exceeded")))
        except UserError as e:  # BadMessages
            return self._done(job, Finished(error=bad_request(str(e), "messages")))
        except Exception as e:
            return self._done(job, crashed(e))
        job.post(Started())
        return answering

    def _join(self, decoder: Decoder, started: list[tuple[Job, Answering]]) -> None:
        """Answers of one adapter setting join its decoder: their prompts prefilled (together where they can be), their
        first tokens picked. A long prompt joining rows under way is prefilled a chunk per step instead, not all
        before their next token."""
        try:
            ended = {id(row) for row in decoder.add_all([answering.row for _, answering in started],
                                                        chunk=self.prefill_chunk)}
        except Exception as e:  # nothing joined (see Decoder.add_all): each of them gets the error
            error = crashed(e)
            for job, _ in started:
                self._done(job, error)
            return
        for job, answering in started:
            if id(answering.row) in ended:
                self._finish(job, answering)
            else:
                self.answering[id(answering.row)] = (job, answering)

    def _step(self) -> None:
        for decoder in self.decoders.values():
            rows = decoder.in_flight
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

