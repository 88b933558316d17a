"""The engine: one thread owns the model and the batch (continuous batching for the server, server.py).

Read in order: APIError (how a request is refused or fails: an HTTP status and OpenAI's error body), the Job (a
request on its way through the engine, its tokens handed back to the event loop that asked), and the Engine:
requests wait in a bounded queue, join free rows of generation.Batch between decode steps and leave the moment
they finish or their client goes away. No request's failure stops the others.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
import traceback
from collections.abc import Callable

import torch
from fastapi.responses import JSONResponse

from . import vision
from .generation import Batch, Request, decode_one_token
from .model import Gemma3


class APIError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": None}
        return JSONResponse({"error": error}, status_code=self.status)


class Job:
    """A request on its way through the engine. Its tokens come back through an asyncio queue on the event
    loop of the HTTP request that made it; None ends them (request.finish_reason then says why, or error).
    media: the prompt's (chat_prompt): Gemma 3's images, preprocessed into request.pixel_values by the engine
    (PyTorch's work on its thread); Gemma 4's images and recordings, preprocessed already (their soft-token
    counts make the prompt)."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop, media: list = ()):
        self.request, self.loop, self.media = request, loop, list(media)
        self.tokens: asyncio.Queue[int | None] = asyncio.Queue()
        self.cancelled = False  # set by the HTTP side: the client went away, or a stop string ended the text
        self.error: APIError | None = None  # why the tokens ended early, for the client

    def deliver(self, token: int | None) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: no one is listening any more
            self.loop.call_soon_threadsafe(self.tokens.put_nowait, token)


class Engine:
    """Continuous batching in one thread (run): between decode steps, cancelled jobs leave their rows and
    waiting jobs take the free ones (their prompts prefilled on joining); then one step decodes a token for
    every active row. Only this thread runs the model, and best the thread that loaded it (serve does so):
    PyTorch's OpenMP gives each thread that runs parallel work its own team of worker threads, and two teams
    on two cores slow every step (bench/README.md, "Serving").

    A request that fails (its prefill, or a decode step it is in) fails with a 500, and the engine goes on; a
    failure sampling one row's token (its logits NaN, say) fails that row's request alone.
    Should the engine's own loop fail (a bug), `failure` says why: every job ends with an error, new ones
    are refused, /health answers 503 and serve returns, so that a supervisor restarts the server."""

    def __init__(self, model: Gemma3, slots: int, context: int, decode_step: Callable = decode_one_token,
                 every_row: bool = False, max_queue: int = 64):  # fmt: skip
        model.setup_cache(slots, context)
        self.model, self.context, self.max_queue = model, context, max_queue
        self.batch = Batch(model, decode_step, every_row)
        self.jobs: set[Job] = set()  # submitted and not yet ended: waiting, joining or running
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: dict[Request, Job] = {}
        self.wake = threading.Condition()
        self.stopping = False
        self.deadline: float | None = None  # shutting down: running jobs are cut at this time.monotonic()
        self.failure: BaseException | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Run in a thread of its own (embedding the server, the tests); serve runs it in the caller's."""
        self.thread = threading.Thread(target=self.run, name="engine", daemon=True)
        self.thread.start()

    @torch.no_grad()
    def warm_up(self) -> None:
        """One decode step over the idle rows, so that a compiled step compiles now, not on the first request."""
        self.batch.decode_step(self.model, self.batch.tokens, self.batch.pos)

    def stop(self) -> None:
        """Thread-safe: cancel what is queued or running (each job's tokens end); run returns."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()

    def shut_down(self, timeout: float) -> None:
        """Thread-safe: take no new jobs, end the waiting ones now and give the running ones `timeout` seconds to
        finish; then cut them (their responses end with an error saying so)."""
        with self.wake:
            self.deadline = time.monotonic() + timeout
            self.wake.notify()

    def submit(self, job: Job) -> None:
        """Queue the job (thread-safe); a 503 if the engine failed, is shutting down, or the queue is full."""
        with self.wake:
            if self.failure is not None:
                raise APIError(503, f"the engine failed ({self.failure!r}): restart the server", "server_error")
            if self.deadline is not None:
                raise APIError(503, "the server is shutting down", "server_busy")
            if len(self.waiting) >= self.max_queue:
                raise APIError(503, f"the server is busy: {len(self.waiting)} requests are waiting; try again later",
                               "server_busy")  # fmt: skip
            self.jobs.add(job)
            self.waiting.append(job)
            self.wake.notify()

    def cancel(self, job: Job) -> None:
        """Thread-safe: the job leaves its row (or the queue) before the next step."""
        job.cancelled = True
        with self.wake:
            self.wake.notify()

    def status(self) -> dict:
        return {"slots": len(self.batch.requests), "active": len(self.running), "waiting": len(self.waiting)}

    def run(self) -> None:
        try:
            self.serve_jobs()
        except BaseException as e:
            traceback.print_exc()
            with self.wake:
                self.failure = e
                jobs = list(self.jobs)
            for job in jobs:  # (the batch may be broken: only tell the clients)
                job.error = APIError(500, f"the engine failed ({e!r}): restart the server", "server_error")
                job.deliver(None)

    def serve_jobs(self) -> None:
        while True:
            with self.wake:
                while not (self.stopping or self.waiting or self.running):
                    self.wake.wait(timeout=0.5)  # (timed: the main thread's signal handlers run meanwhile)
                if self.stopping:
                    break
                for job in [job for job in self.waiting if job.cancelled]:  # its client went away while it waited
                    self.waiting.remove(job)
                    self.finish(job)
                if self.deadline is not None:  # shutting down: nothing more joins; past the deadline nothing runs
                    late = time.monotonic() > self.deadline
                    self.cut([*self.waiting, *(self.running.values() if late else [])])
                    self.waiting.clear()
                joining = [self.waiting.popleft() for _ in range(min(len(self.waiting), len(self.batch.free_rows())))]
            for job in [job for job in self.running.values() if job.cancelled]:
                self.finish(job)
            for job in joining:
                self.join(job)
            self.step()
        self.cut([*self.running.values(), *self.waiting])

    def cut(self, jobs: list[Job]) -> None:
        self.fail(jobs, APIError(503, "the server shut down before this reply was finished", "server_error"))

    def fail(self, jobs: list[Job], error: APIError) -> None:
        for job in jobs:
            job.error = error
            self.finish(job)

    def join(self, job: Job) -> None:
        if job.cancelled:
            return self.finish(job)
        try:
            if job.media and isinstance(self.model, Gemma3):
                size = self.model.config.vision_config.image_size
                job.request.pixel_values = torch.stack([vision.preprocess(image, size) for image in job.media])
            elif job.media:
                job.request.pixel_values = job.media
            self.batch.add(job.request)
        except Exception as e:  # checked before queueing; a failure here is the model's (or a bug): this job's
            return self.fail([job], APIError(500, f"prefill failed: {e!r}", "server_error"))
        self.running[job.request] = job
        self.delivered(job)

    def step(self) -> None:
        try:
            requests = self.batch.step()
        except Exception as e:  # e.g. out of memory: fail the step's jobs, keep serving
            return self.fail(list(self.running.values()), APIError(500, f"decoding failed: {e!r}", "server_error"))
        for request in requests:
            if request.error is not None:  # its row alone failed (Batch.step)
                self.fail([self.running[request]], APIError(500, f"decoding failed: {request.error!r}", "server_error"))
            else:
                self.delivered(self.running[request])

    def delivered(self, job: Job) -> None:
        """Send the job its newest token; end it if that was its last."""
        job.deliver(job.request.tokens[-1])
        if job.request.finish_reason is not None:
            self.finish(job)

    def finish(self, job: Job) -> None:
        """The job leaves its row (if it still has one) and its tokens end."""
        if job.request in self.batch.requests:
            self.batch.remove(job.request)
        self.running.pop(job.request, None)
        with self.wake:
            self.jobs.discard(job)
        job.deliver(None)
