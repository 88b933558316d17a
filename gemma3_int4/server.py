"""An OpenAI-compatible HTTP server over batched decoding: what serve.py runs.

Read in order: the engine (the one thread that runs the model: requests wait in a bounded queue, join free rows of
generation.Batch between decode steps and leave the moment they finish or their client goes away), the request
bodies (pydantic models of OpenAI's chat and completions APIs), turning a chat into a prompt (Gemma's template;
images only as data: URLs, recordings as base64 WAV), stop strings, the gate every request passes (Host, API key,
body size), and the FastAPI app: /v1/models, /v1/chat/completions and /v1/completions (streamed as server-sent
events, or whole), /health, and the chat page at /; last, the connections uvicorn keeps (how many, how long idle)
and serve.

No request can stop the others: its failure fails only itself; its CPU work (tokenizing, decoding images and
recordings) runs off the event loop, its images are checked by size before they are decoded (recordings by length
after), its stop strings are matched in time linear in their length; a client that hangs up frees its row at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import dataclasses
import functools
import hmac
import io
import ipaddress
import json
import logging
import math
import re
import signal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Collection
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import gemma4_audio, vision
from .config import BOS_ID
from .generation import GEMMA_SAMPLING, Batch, Request, Sampling, audio_inputs, decode_one_token, image_inputs, score
from .model import Gemma3
from .tokenizer import AUDIO_MARK, IMAGE_MARK, StreamDecoder, Tokenizer

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


class InputAudio(Strict):
    data: str  # base64
    format: str


class AudioPart(Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


PART_TYPES = ("text", "image_url", "input_audio")


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def known_parts(cls, content: Any) -> Any:
        """An unknown part's type, named (else pydantic reports the union's first member: 'not a string')."""
        for i, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in PART_TYPES:
                known = ", ".join(map(repr, PART_TYPES))
                raise ValueError(f"part {i} has type {kind!r}: the parts this server reads are {known}")
        return content


class StreamOptions(Strict):
    include_usage: bool = False


Finite = Annotated[float, Field(allow_inf_nan=False)]
MAX_STOP_CHARS = 4096
MAX_LOGPROBS = 20


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
    prompt: str | list[int] | list[str] | list[list[int]] = ""  # several (/v1/completions): a choice each
    # /v1/completions, whole (not streamed): each token's log-probability and the `logprobs` most likely tokens'
    # (0 to 20; echo: the prompt's tokens' too, and the text), as OpenAI's legacy completions API answers them
    echo: bool = False
    # What this server cannot do: refused (unsupported) rather than silently ignored, as OpenAI does.
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    response_format: dict | None = None

    def unsupported(self) -> None:
        """A 400 naming the first field that asks for what this server cannot do."""
        scored = not isinstance(self, ChatCompletion) and not self.stream
        several = isinstance(self.prompt, list) and any(isinstance(p, (str, list)) for p in self.prompt)
        asked = {
            "logprobs": self.logprobs not in (None, False) and not (scored and 0 <= self.logprobs <= MAX_LOGPROBS),
            "echo": self.echo and not scored,
            "prompt": several and not scored,  # several prompts: whole only
            "top_logprobs": bool(self.top_logprobs),
            "tools": bool(self.tools),
            "response_format": (self.response_format or {}).get("type", "text") != "text",
        }
        field = next((field for field, asked_for in asked.items() if asked_for), None)
        if field is not None:
            raise APIError(400, f"{field}: not supported by this server (it replies with plain text)", param=field)

    def settings(self) -> tuple[Sampling, list[str]]:
        """How to sample and where to stop, checked (400s) before any work is done. Sampling is Gemma's
        recommended (GEMMA_SAMPLING) where the request says nothing."""
        self.unsupported()
        given = {name: getattr(self, name) for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")}
        try:
            sampling = dataclasses.replace(GEMMA_SAMPLING, **{k: v for k, v in given.items() if v is not None})
        except ValueError as e:  # (Sampling's messages begin with the field's name)
            raise APIError(400, str(e), param=str(e).split()[0]) from None
        return sampling, self.stops()

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 16 or "" in stops or sum(map(len, stops)) > MAX_STOP_CHARS:
            raise APIError(400, f"stop: at most 16 strings, none empty, {MAX_STOP_CHARS} characters in all",
                           param="stop")  # fmt: skip
        return stops


class ChatCompletion(Completion):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# ---------------------------------------------------------------------------------------------------
# A chat as a prompt: Gemma's template (tokenizer.chat_prompt) with the images and recordings in their places.


def chat_prompt(messages: list[Message], tokenizer: Tokenizer, model: Gemma3, context: int) -> tuple[list[int], list]:
    """The prompt's ids, and its media (Job.media): Gemma 3's images in order, at the model's size; Gemma 4's images
    and then its recordings, each kind in order, preprocessed (generation.image_inputs, audio_inputs: how many soft
    tokens each becomes makes the prompt). System (and developer) messages come first and become Gemma's system
    prompt. Media are decoded last, once the model is known to take them (and Gemma 3's context to hold them)."""
    system = []
    while messages and messages[0].role in ("system", "developer"):
        text, media = parts_of(messages[0])
        if media:
            raise APIError(400, "messages[0]: system messages are text only", param="messages")
        system.append(text)
        messages = messages[1:]
    if not messages:
        raise APIError(400, "messages: a chat needs a user message after the system messages", param="messages")
    turns, urls, recordings = [], [], []
    for i, m in enumerate(messages):
        if m.role in ("system", "developer"):
            raise APIError(400, f"messages[{i}]: system messages go before the chat", param="messages")
        text, media = parts_of(m)
        images = [p.image_url.url for p in media if p.type == "image_url"]
        audio = [p.input_audio for p in media if p.type == "input_audio"]
        role = "user" if m.role == "user" else "model"  # "audio": the recordings' soft-token counts, once decoded
        turns.append({"role": role, "content": text, "images": len(images), "audio": len(audio)})
        urls += images
        recordings += audio
    if urls and model.vision is None:
        what = "is text-only" if getattr(model, "audio", None) is None else "has no vision tower"
        raise APIError(400, f"this model {what}: images need Gemma 3 4B, 12B or 27B, or Gemma 4's vision tower",
                       param="messages")  # fmt: skip
    if recordings and getattr(model, "audio", None) is None:
        raise APIError(400, "this model has no audio tower: audio needs Gemma 4 E2B or E4B", param="messages")
    if isinstance(model, Gemma3):  # 256 soft tokens an image: checked before any is decoded
        tokens_per_image = model.config.vision_config.tokens_per_image if model.vision else 0
        if len(urls) * tokens_per_image >= context:
            raise APIError(400, f"{len(urls)} images take {len(urls) * tokens_per_image} tokens, but the context is "
                           f"{context} tokens (serve.py --context)", param="messages")  # fmt: skip
        size = model.config.vision_config.image_size if model.vision else 0
        media = [decode_image(url, functools.partial(vision.resize, size=size)) for url in urls]
        image_counts, audio_counts = [tokens_per_image] * len(urls), []
    else:  # Gemma 4's soft tokens are counted as each image is decoded: decoding stops once they overflow
        pixels, image_counts = [], []
        for i, url in enumerate(urls):
            (image,), (n,) = decode_image(url, lambda full: image_inputs(model, [full]))
            pixels.append(image)
            image_counts.append(n)
            if sum(image_counts) >= context:
                raise APIError(400, f"{i + 1} of the {len(urls)} images take {sum(image_counts)} soft tokens, but the "
                               f"context is {context} tokens (serve.py --context)", param="messages")  # fmt: skip
        try:
            features, audio_counts = audio_inputs([decode_audio(audio) for audio in recordings])
        except ValueError as e:  # (a recording too short for a frame)
            raise APIError(400, f"input_audio: {e}", param="messages") from None
        media, heard = pixels + features, iter(audio_counts)
        for turn in turns:
            turn["audio"] = [next(heard) for _ in range(turn["audio"])]
    try:
        ids = tokenizer.chat_prompt(turns, "\n\n".join(system) or None, image_counts)
    except ValueError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None
    if media and len(ids) >= context:
        raise APIError(400, f"the prompt has {len(ids)} tokens, {sum(image_counts) + sum(audio_counts)} of them the "
                       f"soft tokens of {len(urls)} image(s) and {len(recordings)} recording(s), but the context is "
                       f"{context} tokens (serve.py --context)", param="messages")  # fmt: skip
    return ids, media


def parts_of(message: Message) -> tuple[str, list[ImagePart | AudioPart]]:
    """A message's text, with a mark where each image part (or audio part) is, and those parts."""
    if message.content is None or isinstance(message.content, str):
        return message.content or "", []
    text, media = "", []
    for part in message.content:
        if part.type == "text":
            text += part.text
        else:
            media.append(part)
            text += IMAGE_MARK if part.type == "image_url" else AUDIO_MARK
    return text, media


FULL_SIZE = threading.Lock()  # held while an image (or a recording) is in memory at full size (decode_image)
WEB_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what browsers show (Pillow reads more: EPS through Ghostscript)


def decode_image(url: str, prepare: Callable[[Image.Image], Any]) -> Any:
    """An image from a data: URL (base64), prepared for the model (`prepare`: resized, or preprocessed). Nothing is
    fetched from the network. Its size is checked before it is decoded (Pillow's MAX_IMAGE_PIXELS, about 89
    megapixels, an error here), and it is prepared at once; requests take turns, so that the server holds one
    image at full size at a time (up to a few hundred MB: a PNG of 300 kB can decode to 89 megapixels). Only the
    formats browsers show are read."""
    header, comma, data = url.partition(",")
    if not (url.startswith("data:") and comma and header.endswith(";base64")):
        raise APIError(400, "image_url: only data: URLs with base64 data are accepted (the server fetches nothing)",
                       param="messages")  # fmt: skip
    try:
        raw = base64.b64decode(data, validate=True)
        with FULL_SIZE:
            image = vision.load_image(io.BytesIO(raw), "image_url", Image.MAX_IMAGE_PIXELS, WEB_FORMATS)
            image = prepare(image)  # (which frees the full-size one before the next is decoded)
    except binascii.Error as e:
        raise APIError(400, f"image_url: not base64 ({e})", param="messages") from None
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    return image


def decode_audio(audio: InputAudio) -> np.ndarray:
    """A recording from an input_audio part: base64 WAV (gemma4_audio.load_audio) -> 16 kHz samples, at most
    gemma4_audio.MAX_SECONDS long (what the tower hears; the body's size bounds the decoding). Decoded in turns
    with images (FULL_SIZE): a WAV of 8-bit samples becomes 8 times its size in float64 while it is read."""
    if audio.format != "wav":
        raise APIError(400, f"input_audio: format {audio.format!r} is not read; send WAV (format 'wav')",
                       param="messages")  # fmt: skip
    try:
        raw = base64.b64decode(audio.data, validate=True)
        with FULL_SIZE:
            samples = gemma4_audio.load_audio(io.BytesIO(raw), "input_audio")
    except binascii.Error as e:
        raise APIError(400, f"input_audio: not base64 ({e})", param="messages") from None
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    seconds = len(samples) / gemma4_audio.SAMPLE_RATE
    if seconds > gemma4_audio.MAX_SECONDS:
        raise APIError(400, f"input_audio: {seconds:.1f} s of audio, more than the {gemma4_audio.MAX_SECONDS} s "
                       "allowed", param="messages")  # fmt: skip
    return samples


# ---------------------------------------------------------------------------------------------------
# Stop strings: text is held back while it could still be the start of one.


class StopStrings:
    """The generated text, cut before the first stop string. Each stop string is matched as Knuth, Morris and
    Pratt do: `matched[i]` is the length of the longest prefix of stop i that the text ends with, and each new
    character updates it in constant time (amortized) with the stop's table of borders, however long the stops.
    Text is held back while it could be the start of a stop string: the last max(matched) characters."""

    def __init__(self, stops: list[str]):
        self.stops, self.held = stops, ""
        self.borders = [borders(stop) for stop in stops]
        self.matched = [0] * len(stops)

    def push(self, text: str) -> tuple[str, bool]:
        """Add generated text; return what may be sent now, and whether a stop string ended the text (which
        leaves the stop string and everything after it out)."""
        self.held += text
        for end in range(len(self.held) - len(text) + 1, len(self.held) + 1):  # each new character, ending at `end`
            char, starts = self.held[end - 1], []
            for i, (stop, border) in enumerate(zip(self.stops, self.borders, strict=True)):
                m = self.matched[i]
                while m and stop[m] != char:
                    m = border[m - 1]
                m = self.matched[i] = m + (stop[m] == char)
                if m == len(stop):
                    starts.append(end - m)
            if starts:  # the first stop string to end here (the longest, if several do)
                return self.held[: min(starts)], True
        keep = max(self.matched, default=0)
        ready, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return ready, False


def borders(s: str) -> list[int]:
    """Knuth-Morris-Pratt's table: [j] is the length of the longest proper prefix of s[: j + 1] that is also its
    suffix (where a partial match of s can go on after a mismatch)."""
    table, k = [0] * len(s), 0
    for j in range(1, len(s)):
        while k and s[j] != s[k]:
            k = table[k - 1]
        k += s[j] == s[k]
        table[j] = k
    return table


# ---------------------------------------------------------------------------------------------------
# The gate: what every request passes before the app sees it.

LOCAL_NAMES = ("localhost",)  # the Host names served by default (besides IP addresses, always served)
PUBLIC_PATHS = ("/", "/favicon.ico", "/health")  # the chat page and the health check: no API key
HOST = re.compile(r"(?:\[(?P<ipv6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9._-]+))(?::[0-9]*)?")  # RFC 9110's, lowercase


class Gate:
    """Pure ASGI middleware (Starlette's @app.middleware("http") would hide a client's hang-up from the app) in
    front of every request: its Host header must name this server; the API key, if there is one, is needed
    everywhere but PUBLIC_PATHS (case-insensitive "Bearer", as RFC 6750 says); and its body may not pass
    max_body bytes: refused unread if its Content-Length says so, else once that many bytes have come (a
    chunked body's Content-Length may lie).

    Host: a web page can reach a server on 127.0.0.1 from a browser by DNS rebinding (its own name, resolved
    again to 127.0.0.1), but its requests carry its own name in the Host header. So only the names this server
    is known by are served (`hosts`: localhost, --host, --allow-host; "*" serves any), and IP addresses (a
    URL with an address resolves nothing, so nothing can be rebound).

    And each request is logged, one line once its response ends (`log`, if given: see log_line)."""

    def __init__(self, app: ASGIApp, hosts: Collection[str], api_key: str | None, max_body: int,
                 log: Callable[[str], None] | None = None):  # fmt: skip
        self.app, self.hosts, self.api_key, self.max_body = app, {host.lower() for host in hosts}, api_key, max_body
        self.too_large = f"the request body is over {max_body} bytes (serve.py --max-body-mb)"
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.log is None:
            return await self.checked(scope, receive, send)
        start, status = time.monotonic(), [499]  # (nginx's "client closed the request", if no response began)

        async def noted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.checked(scope, receive, noted)
        finally:
            self.log(log_line(scope, status[0], time.monotonic() - start))

    async def checked(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self.refusal(scope)
        if refusal is not None:
            return await refusal.response()(scope, receive, send)
        read = 0

        async def counted() -> dict:
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > self.max_body:  # (FastAPI reading the body passes it on: the app answers 413)
                raise HTTPException(413, self.too_large)
            return message

        await self.app(scope, counted, send)

    def refusal(self, scope: Scope) -> APIError | None:
        headers = Headers(scope=scope)
        host = headers.get("host")
        if host is not None and not self.serves(host):
            return APIError(403, f"Host {host!r} is not a name of this server (serve.py --allow-host NAME adds one)",
                            "permission_error")  # fmt: skip
        if self.api_key is not None and scope["path"] not in PUBLIC_PATHS:
            scheme, _, key = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
                return APIError(401, "a valid API key is needed: Authorization: Bearer KEY", "authentication_error")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return APIError(413, self.too_large)
        return None

    def serves(self, host: str) -> bool:
        """Whether the Host header names this server. It is a name or an address, and perhaps a port; anything
        else (user@name, name/path: no browser sends them) names none."""
        match = HOST.fullmatch(host.lower())
        if match is None:
            return False
        name = match["ipv6"] or match["name"]
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(name)
            return True
        return "*" in self.hosts or name in self.hosts


def log_line(scope: Scope, status: int, seconds: float) -> str:
    """A request's line in the log: who, what, the status, its tokens (those a completion leaves in its scope's
    state, see respond) and how long it took."""
    client = scope.get("client") or ("-", 0)
    usage = scope.get("state", {}).get("usage")
    tokens = f" {usage['prompt_tokens']} prompt + {usage['completion_tokens']} reply tokens," if usage else ""
    return f'{client[0]} "{scope["method"]} {scope["path"]}" {status},{tokens} {seconds:.2f} s'


# ---------------------------------------------------------------------------------------------------
# The app.


def build_app(engine: Engine, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
              max_body: int = 32 * 2**20, hosts: Collection[str] = LOCAL_NAMES, max_tokens: int | None = None,
              log: Callable[[str], None] | None = None) -> FastAPI:  # fmt: skip
    """The FastAPI app over an engine, which runs apart from it (serve, or Engine.start), behind the Gate.
    max_tokens: a reply's length when its request names none (None: the rest of the context)."""
    model, created = engine.model, int(time.time())
    # a body without a Content-Type is read as JSON; one that says it is something else is refused (invalid_body)
    app = FastAPI(title="gemma3-int4", docs_url=None, redoc_url=None, strict_content_type=False)
    app.add_middleware(Gate, hosts=hosts, api_key=api_key, max_body=max_body, log=log)

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            return APIError(400, f"the body is not valid JSON ({first['ctx']['error']})").response()
        kind = request.headers.get("content-type", "")
        if first["loc"] == ("body",) and kind and kind.split(";")[0].strip().lower() != "application/json":
            # (a body is read as JSON only if its Content-Type says so, or it has none: curl -d says "a form")
            return APIError(400, "the body must be JSON, sent with 'Content-Type: application/json' (this one came "
                            f"as {kind!r})").response()  # fmt: skip
        where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        return APIError(400, f"{where}: {first['msg'].removeprefix('Value error, ')}", param=where).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: HTTPRequest, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), kind).response()

    @app.exception_handler(Exception)
    async def bug(request: HTTPRequest, e: Exception) -> JSONResponse:  # (uvicorn logs its traceback too)
        return APIError(500, f"the server failed: {e!r}", "server_error").response()

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/health")
    async def health() -> JSONResponse:
        """503 once the engine has failed: a supervisor's cue to restart the server."""
        if engine.failure is not None:
            return JSONResponse({"status": "error", "error": f"the engine failed: {engine.failure!r}"}, 503)
        return JSONResponse({"status": "ok", "model": model_name, "vision": model.vision is not None,
                             "audio": getattr(model, "audio", None) is not None, **engine.status()})  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "gemma3-int4"}],
        }

    @app.post("/v1/completions")
    async def completions(body: Completion, http: HTTPRequest):
        sampling, stops = body.settings()
        several = isinstance(body.prompt, list) and any(isinstance(p, (str, list)) for p in body.prompt)
        prompts = body.prompt if several else [body.prompt]
        ids = [await run_in_threadpool(completion_prompt, p, tokenizer, model.config.vocab_size) for p in prompts]
        if not several:
            return await respond(body, sampling, stops, ids[0], [], http, chat=False)
        answers = await asyncio.gather(*[respond(body, sampling, stops, p, [], http, chat=False) for p in ids])
        usage = {k: sum(a["usage"][k] for a in answers) for k in answers[0]["usage"]}
        choices = [{**a["choices"][0], "index": i} for i, a in enumerate(answers)]
        return {**answers[0], "choices": choices, "usage": usage}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletion, http: HTTPRequest):
        sampling, stops = body.settings()
        ids, media = await run_in_threadpool(chat_prompt, body.messages, tokenizer, model, engine.context)
        body.max_tokens = body.max_tokens or body.max_completion_tokens
        return await respond(body, sampling, stops, ids, media, http, chat=True)

    async def respond(body: Completion, sampling: Sampling, stops: list[str], prompt: list[int], media: list,
                      http: HTTPRequest, chat: bool):  # fmt: skip
        if not prompt:
            raise APIError(400, "prompt: empty", param="prompt")
        if len(prompt) >= engine.context:
            raise APIError(400, f"the prompt has {len(prompt)} tokens, but the context is {engine.context} tokens "
                           "(serve.py --context)", param="messages" if chat else "prompt")  # fmt: skip
        generator = None if body.seed is None else torch.Generator().manual_seed(body.seed % 2**64)
        room = engine.context - len(prompt)
        limit = min(body.max_tokens or max_tokens or room, room)
        request = Request(prompt, limit, sampling, tokenizer.stop_ids, generator)
        job = Job(request, asyncio.get_running_loop(), media)
        engine.submit(job)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name}  # fmt: skip
        result = {"finish_reason": None, "completion_tokens": 0, "prompt_tokens": len(prompt), "ids": []}
        pieces = texts(job, stops, result)
        usage = lambda: {"prompt_tokens": len(prompt), "completion_tokens": result["completion_tokens"],
                         "total_tokens": len(prompt) + result["completion_tokens"]}  # fmt: skip
        http.state.usage = result  # (the log line reads its counts once the response ends)
        if not body.stream:
            text = "".join([piece async for piece in watched(pieces, http.receive)])
            choice = {"index": 0, "finish_reason": result["finish_reason"], "logprobs": None}
            if body.logprobs not in (None, False):  # (a completion's: chats refuse logprobs)
                choice["logprobs"] = await run_in_threadpool(logprobs, prompt, result["ids"], body.echo,
                                                             int(body.logprobs))  # fmt: skip
            text = tokenizer.decode(prompt) + text if body.echo else text
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
                    async for piece in watched(pieces, http.receive):
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
                result["ids"].append(token)
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

    def logprobs(prompt: list[int], generated: list[int], echo: bool, top: int) -> dict:
        """OpenAI's logprobs object of a completion: the tokens (the prompt's too with echo; its first has none),
        each one's log-probability, the `top` most likely at each position (at least the best: what tells whether
        the token was the greedy choice), and where each token's text starts. Scored by a plain forward of the
        whole sequence, in this thread, beside the engine's."""
        ids = prompt + generated
        first = 1 if echo else len(prompt)
        scores = score(model, [ids], [first], max(top, 1))[0] if first < len(ids) else None
        n = len(ids) - first
        token_logprobs = ([None] if echo else []) + (scores.logprobs.tolist() if n else [])
        top_logprobs = [None] if echo else []
        for i in range(n):
            pairs = zip(scores.top_ids[i].tolist(), scores.top_logprobs[i].tolist(), strict=True)
            top_logprobs.append({token_text(tokenizer, t): lp for t, lp in pairs})
        tokens = [token_text(tokenizer, t) for t in (ids if echo else generated)]
        offsets = [0 if echo else len(tokenizer.decode(prompt))]
        for t in tokens[:-1]:
            offsets.append(offsets[-1] + len(t))
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets[: len(tokens)]}  # fmt: skip

    return app


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """A token as text: its piece, spaces as spaces (a byte piece stays <0x..>, a control token its name)."""
    return tokenizer.sp.id_to_piece(token).replace("\u2581", " ") if token < tokenizer.vocab_size else ""


def completion_prompt(prompt: str | list[int], tokenizer: Tokenizer, vocab_size: int) -> list[int]:
    """/v1/completions' prompt as ids: a string after <bos>, or the ids given (checked)."""
    if isinstance(prompt, list):
        if any(not 0 <= t < vocab_size for t in prompt):
            raise APIError(400, f"prompt: token ids go from 0 to {vocab_size - 1}", param="prompt")
        return prompt
    try:
        return [BOS_ID, *tokenizer.encode(prompt)]
    except ValueError as e:
        raise APIError(400, f"prompt: {e}", param="prompt") from None


def sse(payload: dict) -> bytes:
    return format_sse_event(data_str=json.dumps(payload, ensure_ascii=False))


async def watched(pieces: AsyncIterator[str], receive: Receive) -> AsyncIterator[str]:
    """The pieces until the client hangs up: then the one awaited is cancelled, which frees the job's row at once
    (texts), whether the reply is streamed or whole."""
    hung_up, iterator = asyncio.ensure_future(hang_up(receive)), aiter(pieces)
    try:
        while True:
            piece = asyncio.ensure_future(anext(iterator))
            await asyncio.wait([piece, hung_up], return_when=asyncio.FIRST_COMPLETED)
            if not piece.done():
                piece.cancel()
                return
            try:
                text = piece.result()
            except StopAsyncIteration:
                return
            yield text
    finally:
        hung_up.cancel()


async def hang_up(receive: Receive) -> None:
    """Returns when the client hangs up: once the request's body is read, uvicorn's receive() waits for that (or
    for the response to be complete)."""
    while (await receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------------------------------------------
# Connections, and serving.

logger = logging.getLogger("uvicorn.error")  # (uvicorn's: its warnings and ours read alike)


@dataclasses.dataclass
class ConnectionLimit:
    """What the connections share: how many may be open, and when refusing more was last logged."""

    most: int
    logged: float = -math.inf


class Connection(H11Protocol):
    """uvicorn's HTTP/1.1 connection, limited. Beyond `limit.most` open connections, a new one is closed at once
    (before the process runs out of file descriptors, where each failed accept is logged), logged once a minute
    at most. And a connection has uvicorn's keep-alive timeout (serve.py --idle-timeout) to send each request's
    head, from the moment it opens (uvicorn's timer starts only when a response ends, and restarts at every
    byte that trickles in)."""

    def __init__(self, *args, limit: ConnectionLimit, **kwargs):
        super().__init__(*args, **kwargs)
        self.limit = limit

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limit.most:
            if time.monotonic() - self.limit.logged > 60:
                logger.warning(f"{len(self.connections)} connections are open, the most allowed (serve.py "
                               "--max-connections): new ones are closed until some end")  # fmt: skip
                self.limit.logged = time.monotonic()
            self.transport = transport  # (for connection_lost)
            transport.close()
            return
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)  # uvicorn's, less its restart of the timer: a request's head cancels it
        self.handle_events()


def uvicorn_config(app: FastAPI, max_connections: int = 100, idle_timeout: float = 5.0,
                   shutdown_timeout: float = 5.0) -> uvicorn.Config:  # fmt: skip
    """uvicorn's settings for the app: HTTP/1.1 through Connection, with its limits."""
    connection = functools.partial(Connection, limit=ConnectionLimit(max_connections))
    return uvicorn.Config(app, http=connection, log_level="warning", timeout_keep_alive=idle_timeout,
                          timeout_graceful_shutdown=shutdown_timeout + 5)  # fmt: skip


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (an IPv6 address too): bound before the server says it is serving."""
    return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)


def serve(app: FastAPI, engine: Engine, sock: socket.socket, shutdown_timeout: float, max_connections: int = 100,
          idle_timeout: float = 5.0) -> bool:  # fmt: skip
    """Serve the app with uvicorn on the listening socket in a thread, and run the engine in this one (the
    thread that loaded the model, see Engine) until SIGINT or SIGTERM: then uvicorn takes no new connections,
    the requests in flight get shutdown_timeout seconds before the engine cuts them, and both stop. False: the
    server did not start (uvicorn said why), or the engine failed (and the server stopped with it, so that a
    supervisor can restart it)."""
    server = uvicorn.Server(uvicorn_config(app, max_connections, idle_timeout, shutdown_timeout))

    def http() -> None:
        try:
            server.run(sockets=[sock])
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
    server.should_exit = True  # (the engine stopped: uvicorn already is, unless the engine failed)
    thread.join()
    return server.started and engine.failure is None
