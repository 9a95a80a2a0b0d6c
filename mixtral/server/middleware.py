"""What every request passes before a route sees it: the bearer key, the body size, and the
request counter. Pure ASGI (no BaseHTTPMiddleware), so that disconnects reach the handlers."""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mixtral.server import protocol
from mixtral.server.protocol import error_body
from mixtral.server.state import Metrics

ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions"}


async def send_json(send: Send, status: int, body: dict[str, Any],
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


class RequireKey:
    """Bearer key on /v1/* (constant-time compare); the page, /health and /metrics stay open."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app = app
        self.digest = hashlib.sha256(key.encode()).digest() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.digest and scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = header.partition(" ")
            given = hashlib.sha256(token.strip().encode()).digest()
            if scheme.lower() != "bearer" or not secrets.compare_digest(given, self.digest):
                await send_json(send, 401, protocol.unauthorized_body(),
                                [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


class LimitBody:
    """Read request bodies up front (they are small JSON) and refuse oversized ones with 413."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await send_json(send, 413, error_body(
                    f"request body larger than {self.limit} bytes", "invalid_request_error"))
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
