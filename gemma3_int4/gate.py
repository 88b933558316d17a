"""The gate: what every request to the server (server.py) passes before the app sees it.

Gate is pure ASGI middleware: it checks the Host header (against DNS rebinding), the API key and the body's size,
refusing in OpenAI's error shape (APIError), and logs one line per request once its response ends (log_line).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import re
import time
from collections.abc import Callable, Collection

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .engine import APIError

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
    state, see server.Routes.respond) and how long it took."""
    client = scope.get("client") or ("-", 0)
    usage = scope.get("state", {}).get("usage")
    tokens = f" {usage['prompt_tokens']} prompt + {usage['completion_tokens']} reply tokens," if usage else ""
    return f'{client[0]} "{scope["method"]} {scope["path"]}" {status},{tokens} {seconds:.2f} s'
