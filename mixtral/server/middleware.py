"""What every request passes before a route sees it (besides exposure.py's checks): one body
framing, a body of bounded size that arrives in bounded time, and the request counter. Pure
ASGI (no BaseHTTPMiddleware), so that disconnects reach the handlers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mixtral.server.protocol import error_body
from mixtral.server.state import Metrics, State

ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions"}


async def send_json(send: Send, status: int, body: dict[str, Any],
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


class OneFraming:
    """400, and the connection closed, for a request with both Content-Length and
    Transfer-Encoding (RFC 9112 section 6.1): two parties could read two different bodies
    from it (request smuggling). h11 itself follows Transfer-Encoding alone."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            names = {k for k, _ in scope["headers"]}
            if b"content-length" in names and b"transfer-encoding" in names:
                await send_json(send, 400, error_body(
                    "a request may have Content-Length or Transfer-Encoding, not both",
                    "invalid_request_error"), [(b"connection", b"close")])
                return
        await self.app(scope, receive, send)


class LimitBody:
    """Read request bodies up front (they are small JSON): 413 for one over `limit` bytes, 408
    (and the connection closed) for one that takes longer than `timeout` seconds to arrive."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float) -> None:
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        with anyio.move_on_after(self.timeout) as reading:
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.limit:
                    await send_json(send, 413, error_body(
                        f"request body larger than {self.limit} bytes",
                        "invalid_request_error"))
                    return
        if reading.cancelled_caught:
            await send_json(send, 408, error_body(
                f"the request body did not arrive within {self.timeout:g} s",
                "invalid_request_error"), [(b"connection", b"close")])
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: wait for the disconnect

        await self.app(scope, replay, send)


class CountRequests:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def spy(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, spy)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(route, str(status)).inc()


class QuietDrain:
    """A request that uvicorn cancels at the end of a shutdown ends without a traceback in
    the log: State.cut has told its client (uvicorn's own line says how many it cancelled)."""

    def __init__(self, app: ASGIApp, state: State) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            if not self.state.draining:
                raise
