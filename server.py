"""An OpenAI-compatible HTTP server over batched decoding: what serve.py runs.

Read in order: the engine (the one thread that runs the model: requests wait in a bounded queue, join free rows of
generation.Batch between decode steps and leave the moment they finish or their client goes away), the request
bodies (pydantic models of OpenAI's chat and completions APIs), turning a chat into a prompt (Gemma's template;
images only as data: URLs), stop strings, and the FastAPI app: /v1/models, /v1/chat/completions and
/v1/completions (streamed as server-sent events, or whole), /health, and the chat page at /.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import dataclasses
import hmac
import io
import json
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Literal

import torch
import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

import vision
from config import BOS_ID
from generation import GEMMA_SAMPLING, Batch, Request, Sampling, decode_one_token
from model import Gemma3
from tokenizer import IMAGE_MARK, StreamDecoder, Tokenizer

PAGE = Path(__file__).with_name("chat.html")


class APIError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": None}
        return JSONResponse({"error": error}, status_code=self.status)


# ---------------------------------------------------------------------------------------------------
# The engine: one thread owns the model and the batch; the HTTP side only queues jobs and reads their tokens.


class Job:
    """A request on its way through the engine. Its tokens come back through an asyncio queue on the event
    loop of the HTTP request that made it; None ends them (request.finish_reason then says why, or error).
    images: the prompt's, preprocessed into request.pixel_values by the engine (PyTorch's work on its thread)."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop, images: list[Image.Image] = ()):
        self.request, self.loop, self.images = request, loop, list(images)
        self.tokens: asyncio.Queue[int | None] = asyncio.Queue()
        self.cancelled = False  # set by the HTTP side: the client went away, or a stop string ended the text
        self.error: APIError | None = None  # why the tokens ended early, for the client

    def deliver(self, token: int | None) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: no one is listening any more
            self.loop.call_soon_threadsafe(self.tokens.put_nowait, token)


class Busy(Exception):
    pass


class Engine:
    """Continuous batching in one thread (run): between decode steps, cancelled jobs leave their rows and
    waiting jobs take the free ones (their prompts prefilled on joining); then one step decodes a token for
    every active row. Only this thread runs the model, and best the thread that loaded it (serve does so):
    PyTorch's OpenMP gives each thread that runs parallel work its own team of worker threads, and two teams
    on two cores slow every step (bench/README.md, "Serving")."""

    def __init__(self, model: Gemma3, slots: int, context: int, decode_step: Callable = decode_one_token,
                 every_row: bool = False, max_queue: int = 64):  # fmt: skip
        model.setup_cache(slots, context)
        self.model, self.context, self.max_queue = model, context, max_queue
        self.batch = Batch(model, decode_step, every_row)
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: dict[Request, Job] = {}
        self.wake = threading.Condition()
        self.stopping = False
        self.deadline: float | None = None  # shutting down: running jobs are cut at this time.monotonic()
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
        with self.wake:
            if self.deadline is not None:
                raise Busy("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise Busy(f"the server is busy: {len(self.waiting)} requests are waiting; try again later")
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
        while True:
            with self.wake:
                while not (self.stopping or self.waiting or self.running):
                    self.wake.wait(timeout=0.5)  # (timed: the main thread's signal handlers run meanwhile)
                if self.stopping:
                    break
                if self.deadline is not None:  # shutting down: nothing more joins; past the deadline nothing runs
                    late = time.monotonic() > self.deadline
                    self.cut([*self.waiting, *(self.running.values() if late else [])])
                    self.waiting.clear()
                joining = [self.waiting.popleft() for _ in range(min(len(self.waiting), len(self.batch.free_rows())))]
            for job in [job for job in self.running.values() if job.cancelled]:
                self.batch.remove(job.request)
                self.finish(job)
            for job in joining:
                self.join(job)
            self.step()
        self.cut([*self.running.values(), *self.waiting])

    def cut(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.request in self.running:
                self.batch.remove(job.request)
            job.error = APIError(503, "the server shut down before this reply was finished", "server_error")
            self.finish(job)

    def join(self, job: Job) -> None:
        if job.cancelled:
            return job.deliver(None)
        try:
            if job.images:
                size = self.model.config.vision_config.image_size
                job.request.pixel_values = torch.stack([vision.preprocess(image, size) for image in job.images])
            self.batch.add(job.request)
        except (ValueError, RuntimeError) as e:  # checked before queueing; a failure here is the model's
            job.error = APIError(500, f"prefill failed: {e}", "server_error")
            return job.deliver(None)
        self.running[job.request] = job
        self.delivered(job)

    def step(self) -> None:
        try:
            requests = self.batch.step()
        except RuntimeError as e:  # e.g. out of memory: fail the batch's jobs, keep serving
            for job in list(self.running.values()):
                self.batch.remove(job.request)
                job.error = APIError(500, f"decoding failed: {e}", "server_error")
                self.finish(job)
            return
        for request in requests:
            self.delivered(self.running[request])

    def delivered(self, job: Job) -> None:
        """Send the job its newest token; end it if that was its last."""
        job.deliver(job.request.tokens[-1])
        if job.request.finish_reason is not None:
            self.finish(job)

    def finish(self, job: Job) -> None:
        self.running.pop(job.request, None)
        job.deliver(None)


# ---------------------------------------------------------------------------------------------------
# Request bodies: OpenAI's fields, strictly typed (a string where a number goes is an error, not a guess).
# Unknown fields are ignored, as OpenAI-compatible servers do. Sampling defaults are Gemma's.


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageURL(Strict):
    url: str
    detail: str | None = None


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None


class StreamOptions(Strict):
    include_usage: bool = False


Finite = Annotated[float, Field(allow_inf_nan=False)]


class Completion(Strict):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: Finite | None = Field(None, ge=0)
    top_p: Finite | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: Finite | None = Field(None, ge=0, lt=1)
    repetition_penalty: Finite | None = Field(None, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None
    prompt: str | list[int] = ""

    def sampling(self) -> Sampling:
        """Gemma's recommended sampling (GEMMA_SAMPLING) where the request says nothing."""
        given = {name: getattr(self, name) for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")}
        return dataclasses.replace(GEMMA_SAMPLING, **{k: v for k, v in given.items() if v is not None})

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 16 or "" in stops:
            raise APIError(400, "stop: at most 16 strings, none empty", param="stop")
        return stops


class ChatCompletion(Completion):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# ---------------------------------------------------------------------------------------------------
# A chat as a prompt: Gemma's template (tokenizer.chat_prompt) with the images in their places.


def chat_prompt(messages: list[Message], tokenizer: Tokenizer, model: Gemma3) -> tuple[list[int], list[Image.Image]]:
    """The prompt's ids, and its images in order. System (and developer) messages come first and become
    Gemma's system prompt, which has no role of its own."""
    system = []
    while messages and messages[0].role in ("system", "developer"):
        system.append(text_of(messages[0], []))
        messages = messages[1:]
    if not messages:
        raise APIError(400, "messages: a chat needs a user message after the system messages", param="messages")
    turns, images = [], []
    for i, m in enumerate(messages):
        if m.role in ("system", "developer"):
            raise APIError(400, f"messages[{i}]: system messages go before the chat", param="messages")
        before = len(images)
        turns.append({"role": "user" if m.role == "user" else "model", "content": text_of(m, images),
                      "images": len(images) - before})  # fmt: skip
    if images and model.vision is None:
        raise APIError(400, "this model is text-only: images need Gemma 3 4B, 12B or 27B", param="messages")
    tokens_per_image = model.config.vision_config.tokens_per_image if model.vision else 0
    try:
        ids = tokenizer.chat_prompt(turns, "\n\n".join(system) or None, tokens_per_image)
    except ValueError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None
    return ids, images


def text_of(message: Message, images: list) -> str:
    """A message's text, with an image mark where each image part was (its decoded image appended to images)."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    text = ""
    for part in message.content:
        if part.type == "text":
            text += part.text
        else:
            images.append(decode_image(part.image_url.url))
            text += IMAGE_MARK
    return text


def decode_image(url: str) -> Image.Image:
    """An image from a data: URL (base64). Nothing is fetched from the network."""
    header, comma, data = url.partition(",")
    if not (url.startswith("data:") and comma and header.endswith(";base64")):
        raise APIError(400, "image_url: only data: URLs with base64 data are accepted (the server fetches nothing)",
                       param="messages")  # fmt: skip
    try:
        raw = base64.b64decode(data, validate=True)
        return vision.load_image(io.BytesIO(raw), "image_url")
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"image_url: not a readable image ({e})", param="messages") from None


# ---------------------------------------------------------------------------------------------------
# Stop strings: text is held back while it could still be the start of one.


class StopStrings:
    def __init__(self, stops: list[str]):
        self.stops, self.held = stops, ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add generated text; return what may be sent now, and whether a stop string ended the text (which
        leaves the stop string and everything after it out)."""
        self.held += text
        hits = [i for i in (self.held.find(stop) for stop in self.stops) if i >= 0]
        if hits:
            return self.held[: min(hits)], True
        keep = max((k for stop in self.stops for k in range(1, len(stop)) if self.held.endswith(stop[:k])), default=0)
        ready, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return ready, False


# ---------------------------------------------------------------------------------------------------
# The app.


def build_app(
    engine: Engine, tokenizer: Tokenizer, model_name: str, api_key: str | None = None, max_body: int = 32 * 2**20
) -> FastAPI:
    """The FastAPI app over an engine, which runs apart from it (serve, or Engine.start). A request body over
    max_body bytes is refused unread (413), as is a body without a Content-Length (411)."""
    model, created = engine.model, int(time.time())
    app = FastAPI(title="gemma3-int4", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        message = "the body is not valid JSON" if first["type"] == "json_invalid" else f"{where}: {first['msg']}"
        return APIError(400, message, param=where).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: HTTPRequest, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), kind).response()

    @app.middleware("http")
    async def limit_body(request: HTTPRequest, call_next):
        length = request.headers.get("content-length")
        if request.method == "POST" and not (length or "").isdigit():
            return APIError(411, "a request body needs a Content-Length").response()
        if length is not None and length.isdigit() and int(length) > max_body:
            return APIError(413, f"the request body is over {max_body} bytes (serve.py --max-body-mb)").response()
        return await call_next(request)

    @app.middleware("http")
    async def check_key(request: HTTPRequest, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return APIError(
                    401, "a valid API key is needed: Authorization: Bearer KEY", "authentication_error"
                ).response()
        return await call_next(request)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "vision": model.vision is not None, **engine.status()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "gemma3-int4"}],
        }

    @app.post("/v1/completions")
    async def completions(body: Completion, http: HTTPRequest):
        if isinstance(body.prompt, str):
            try:
                prompt = [BOS_ID, *tokenizer.encode(body.prompt)]
            except ValueError as e:
                raise APIError(400, f"prompt: {e}", param="prompt") from None
        else:
            prompt = body.prompt
            if any(not 0 <= t < model.config.vocab_size for t in prompt):
                raise APIError(400, f"prompt: token ids go from 0 to {model.config.vocab_size - 1}", param="prompt")
        return await respond(body, prompt, [], http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletion, http: HTTPRequest):
        ids, images = await run_in_threadpool(chat_prompt, body.messages, tokenizer, model)
        body.max_tokens = body.max_tokens or body.max_completion_tokens
        return await respond(body, ids, images, http, chat=True)

    async def respond(body: Completion, prompt: list[int], images: list, http: HTTPRequest, chat: bool):
        if not prompt:
            raise APIError(400, "prompt: empty", param="prompt")
        if len(prompt) >= engine.context:
            raise APIError(400, f"the prompt has {len(prompt)} tokens, but the context is {engine.context} tokens "
                           "(serve.py --context)", param="messages" if chat else "prompt")  # fmt: skip
        stops = body.stops()
        try:
            sampling = body.sampling()
        except ValueError as e:
            raise APIError(400, str(e)) from None
        generator = None if body.seed is None else torch.Generator().manual_seed(body.seed % 2**64)
        room = engine.context - len(prompt)
        request = Request(prompt, min(body.max_tokens or room, room), sampling, tokenizer.stop_ids, generator)
        job = Job(request, asyncio.get_running_loop(), images)
        try:
            engine.submit(job)
        except Busy as e:
            raise APIError(503, str(e), "server_busy") from None
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name}  # fmt: skip
        result = {"finish_reason": None, "completion_tokens": 0}
        pieces = texts(job, stops, result)
        usage = lambda: {"prompt_tokens": len(prompt), "completion_tokens": result["completion_tokens"],
                         "total_tokens": len(prompt) + result["completion_tokens"]}  # fmt: skip
        if not body.stream:
            text = "".join([piece async for piece in watched(pieces, http, job)])
            choice = {"index": 0, "finish_reason": result["finish_reason"], "logprobs": None}
            choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            return {**head, "choices": [choice], "usage": usage()}

        def chunk(piece: str | None, finish_reason: str | None = None) -> bytes:
            if chat:
                delta = {} if piece is None else {"content": piece} if piece else {"role": "assistant", "content": ""}
                choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": finish_reason, "logprobs": None}
                obj = "text_completion"
            return sse({**head, "object": obj, "choices": [choice]})

        async def events() -> AsyncIterator[bytes]:
            try:
                yield chunk("")
                try:
                    async for piece in pieces:
                        yield chunk(piece)
                except APIError as e:  # the model failed mid-stream: say so in the stream, as OpenAI does
                    yield sse({"error": {"message": e.message, "type": e.type, "param": None, "code": None}})
                    return
                yield chunk(None, result["finish_reason"])
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({**head, "object": "chat.completion.chunk" if chat else "text_completion",
                               "choices": [], "usage": usage()})  # fmt: skip
                yield format_sse_event(data_str="[DONE]")
            finally:  # finished, or the client went away (the response is cancelled): free the row now
                engine.cancel(job)

        return EventSourceResponse(events())

    async def texts(job: Job, stops: list[str], result: dict) -> AsyncIterator[str]:
        """The job's text as it is generated; result gets finish_reason and completion_tokens at the end."""
        decoder, stop = StreamDecoder(tokenizer), StopStrings(stops)
        try:
            while (token := await job.tokens.get()) is not None:
                result["completion_tokens"] += 1
                if token in tokenizer.stop_ids:
                    continue
                text, hit = stop.push(decoder.push(token))
                if text:
                    yield text
                if hit:
                    result["finish_reason"] = "stop"
                    return
            if job.error is not None:
                raise job.error
            if stop.held:
                yield stop.held
            result["finish_reason"] = job.request.finish_reason
        finally:
            engine.cancel(job)

    return app


def serve(app: FastAPI, engine: Engine, host: str, port: int, shutdown_timeout: float) -> bool:
    """Serve the app with uvicorn in a thread and run the engine in this one (the thread that loaded the
    model, see Engine) until SIGINT or SIGTERM: then uvicorn takes no new connections, the requests in
    flight get shutdown_timeout seconds before the engine cuts them, and both stop. False: the server did not
    start (uvicorn said why, e.g. the port is taken)."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_timeout + 5
    )
    server = uvicorn.Server(config)

    def http() -> None:
        try:
            server.run()
        finally:
            engine.stop()

    def on_signal(sig: int, frame) -> None:
        engine.shut_down(shutdown_timeout)
        server.force_exit = server.should_exit  # a second Ctrl-C: at once
        server.should_exit = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    thread = threading.Thread(target=http, name="http")
    thread.start()
    engine.run()
    thread.join()
    return server.started


def sse(payload: dict) -> bytes:
    return format_sse_event(data_str=json.dumps(payload, ensure_ascii=False))


async def watched(pieces: AsyncIterator[str], http: HTTPRequest, job: Job) -> AsyncIterator[str]:
    """The pieces, until the client goes away (checked each second): a whole response's client that hangs up
    frees its row too."""
    iterator = aiter(pieces)
    while True:
        task = asyncio.ensure_future(anext(iterator))
        while not task.done():
            await asyncio.wait([task], timeout=1.0)
            if not task.done() and await http.is_disconnected():
                task.cancel()
                return
        try:
            piece = task.result()
        except StopAsyncIteration:
            return
        yield piece
