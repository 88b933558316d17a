"""An OpenAI-compatible HTTP server over batched decoding: what serve.py runs.

Read in order: build_app (the FastAPI app, behind gate.Gate: OpenAI's errors, the chat page at /, /health,
/v1/models, and Routes: /v1/chat/completions and /v1/completions, streamed as server-sent events or whole), then
the connections uvicorn keeps (how many, how long idle) and serve. Below it: engine.py (the one thread that runs
the model), openai_api.py (the request bodies, chats as prompts, stop strings, the replies' pieces) and gate.py
(Host, API key, body size, the log line).

No request can stop the others: its failure fails only itself; its CPU work (tokenizing, decoding images and
recordings) runs off the event loop, its images are checked by size before they are decoded (recordings by length
after), its stop strings are matched in time linear in their length; a client that hangs up frees its row at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import Receive
from uvicorn.protocols.http.h11_impl import H11Protocol

from .engine import APIError, Engine, Job
from .gate import LOCAL_NAMES, Gate
from .generation import Request, Sampling
from .openai_api import (
    ChatCompletion,
    Completion,
    StopStrings,
    chat_prompt,
    chunk,
    completion_prompt,
    logprobs,
    sse,
    usage,
)
from .tokenizer import StreamDecoder, Tokenizer

PAGE = Path(__file__).with_name("chat.html")


# ---------------------------------------------------------------------------------------------------
# The app.


def build_app(engine: Engine, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
              max_body: int = 32 * 2**20, hosts: Collection[str] = LOCAL_NAMES, max_tokens: int | None = None,
              log: Callable[[str], None] | None = None) -> FastAPI:  # fmt: skip
    """The FastAPI app over an engine, which runs apart from it (serve, or Engine.start), behind the Gate.
    max_tokens: a reply's length when its request names none (None: the rest of the context)."""
    # a body without a Content-Type is read as JSON; one that says it is something else is refused (invalid_body)
    app = FastAPI(title="gemma3-int4", docs_url=None, redoc_url=None, strict_content_type=False)
    app.add_middleware(Gate, hosts=hosts, api_key=api_key, max_body=max_body, log=log)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, bug)
    app.get("/", include_in_schema=False)(page)
    app.get("/favicon.ico", include_in_schema=False)(favicon)
    routes = Routes(engine, tokenizer, model_name, max_tokens)
    app.get("/health")(routes.health)
    app.get("/v1/models")(routes.models)
    app.post("/v1/completions")(routes.completions)
    app.post("/v1/chat/completions")(routes.chat_completions)
    return app


# Every error is answered in OpenAI's shape (APIError.response), whoever raised it.


async def api_error(request: HTTPRequest, e: APIError) -> JSONResponse:
    return e.response()


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


async def http_error(request: HTTPRequest, e: HTTPException) -> JSONResponse:
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return APIError(e.status_code, str(e.detail), kind).response()


async def bug(request: HTTPRequest, e: Exception) -> JSONResponse:  # (uvicorn logs its traceback too)
    return APIError(500, f"the server failed: {e!r}", "server_error").response()


async def page() -> FileResponse:
    return FileResponse(PAGE, media_type="text/html")


async def favicon() -> Response:
    return Response(status_code=204)


class Routes:
    """The API's routes over one engine: what they share is the engine (and its model), the tokenizer, the
    model's name and a reply's default length."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str, max_tokens: int | None):
        self.engine, self.model, self.tokenizer, self.model_name = engine, engine.model, tokenizer, model_name
        self.max_tokens, self.created = max_tokens, int(time.time())

    async def health(self) -> JSONResponse:
        """503 once the engine has failed: a supervisor's cue to restart the server."""
        engine, model = self.engine, self.model
        if engine.failure is not None:
            return JSONResponse({"status": "error", "error": f"the engine failed: {engine.failure!r}"}, 503)
        return JSONResponse({"status": "ok", "model": self.model_name, "vision": model.vision is not None,
                             "audio": getattr(model, "audio", None) is not None, **engine.status()})  # fmt: skip

    async def models(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "created": self.created, "owned_by": "gemma3-int4"}],
        }

    async def completions(self, body: Completion, http: HTTPRequest):
        sampling, stops = body.settings()
        several = isinstance(body.prompt, list) and any(isinstance(p, (str, list)) for p in body.prompt)
        prompts = body.prompt if several else [body.prompt]
        vocab_size = self.model.config.vocab_size
        ids = [await run_in_threadpool(completion_prompt, p, self.tokenizer, vocab_size) for p in prompts]
        if not several:
            return await self.respond(body, sampling, stops, ids[0], [], http, chat=False)
        answers = await asyncio.gather(*[self.respond(body, sampling, stops, p, [], http, chat=False) for p in ids])
        total = {k: sum(a["usage"][k] for a in answers) for k in answers[0]["usage"]}
        choices = [{**a["choices"][0], "index": i} for i, a in enumerate(answers)]
        return {**answers[0], "choices": choices, "usage": total}

    async def chat_completions(self, body: ChatCompletion, http: HTTPRequest):
        sampling, stops = body.settings()
        context = self.engine.context
        ids, media = await run_in_threadpool(chat_prompt, body.messages, self.tokenizer, self.model, context)
        body.max_tokens = body.max_tokens or body.max_completion_tokens
        return await self.respond(body, sampling, stops, ids, media, http, chat=True)

    async def respond(self, body: Completion, sampling: Sampling, stops: list[str], prompt: list[int], media: list,
                      http: HTTPRequest, chat: bool):  # fmt: skip
        """The reply to a prompt: whole, or (body.stream) as server-sent events (events)."""
        engine, tokenizer = self.engine, self.tokenizer
        if not prompt:
            raise APIError(400, "prompt: empty", param="prompt")
        if len(prompt) >= engine.context:
            raise APIError(400, f"the prompt has {len(prompt)} tokens, but the context is {engine.context} tokens "
                           "(serve.py --context)", param="messages" if chat else "prompt")  # fmt: skip
        generator = None if body.seed is None else torch.Generator().manual_seed(body.seed % 2**64)
        room = engine.context - len(prompt)
        limit = min(body.max_tokens or self.max_tokens or room, room)
        request = Request(prompt, limit, sampling, tokenizer.stop_ids, generator)
        job = Job(request, asyncio.get_running_loop(), media)
        engine.submit(job)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name}  # fmt: skip
        result = {"finish_reason": None, "completion_tokens": 0, "prompt_tokens": len(prompt), "ids": []}
        pieces = self.texts(job, stops, result)
        http.state.usage = result  # (the log line reads its counts once the response ends)
        if body.stream:
            return EventSourceResponse(self.events(body, head, chat, job, pieces, result, http.receive))
        text = "".join([piece async for piece in watched(pieces, http.receive)])
        choice = {"index": 0, "finish_reason": result["finish_reason"], "logprobs": None}
        if body.logprobs not in (None, False):  # (a completion's: chats refuse logprobs)
            choice["logprobs"] = await run_in_threadpool(logprobs, self.model, tokenizer, prompt, result["ids"],
                                                         body.echo, int(body.logprobs))  # fmt: skip
        text = tokenizer.decode(prompt) + text if body.echo else text
        choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        return {**head, "choices": [choice], "usage": usage(result)}

    async def events(self, body: Completion, head: dict, chat: bool, job: Job, pieces: AsyncIterator[str],
                     result: dict, receive: Receive) -> AsyncIterator[bytes]:  # fmt: skip
        """A streamed reply's server-sent events: a chunk per piece of text, the finish reason, the usage if asked
        for, and [DONE]."""
        try:
            yield chunk(head, chat, "")
            try:
                async for piece in watched(pieces, receive):
                    yield chunk(head, chat, piece)
            except APIError as e:  # the model failed mid-stream: say so in the stream, as OpenAI does
                yield sse({"error": {"message": e.message, "type": e.type, "param": None, "code": None}})
                return
            yield chunk(head, chat, None, result["finish_reason"])
            if body.stream_options and body.stream_options.include_usage:
                yield sse({**head, "object": "chat.completion.chunk" if chat else "text_completion",
                           "choices": [], "usage": usage(result)})  # fmt: skip
            yield format_sse_event(data_str="[DONE]")
        finally:  # finished, or the client went away (the response is cancelled): free the row now
            self.engine.cancel(job)

    async def texts(self, job: Job, stops: list[str], result: dict) -> AsyncIterator[str]:
        """The job's text as it is generated; result gets finish_reason and completion_tokens at the end."""
        tokenizer = self.tokenizer
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
            self.engine.cancel(job)


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
