"""Who may reach the server: the Host and Origin a request names, and the bearer key.

A web page on any site can make the visitor's browser send requests to 127.0.0.1; with DNS
rebinding it can even read the answers, under a name it controls that resolves to 127.0.0.1.
Such a request names the attacker's host (`Host: attacker.example`) or, sent by a page, its
origin (`Origin: https://attacker.example`). So both must name an allowed host: localhost
names and loopback addresses always, the address the server is bound to, any IP address
when it is bound to all of them (a bare IP address cannot be rebound), and the names given
with --allow-host ("*": any, like Ollama's OLLAMA_ORIGINS=*). Clients that are not browsers
send no Origin and their own Host, which passes.

The bearer key, when one is set, guards everything but the page, /health and /metrics:
/v1/* and the API's description (/openapi.json).
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from mixtral.server import protocol
from mixtral.server.middleware import send_json
from mixtral.server.protocol import clip, error_body
from mixtral.server.state import check_key

OPEN = {"/", "/health", "/metrics"}  # what answers without the key
WILDCARDS = {"0.0.0.0", "::", ""}  # bind addresses that mean every interface


class Hosts:
    """The allow-list of Host and Origin names."""

    def __init__(self, allowed: tuple[str, ...]) -> None:
        self.any = "*" in allowed
        self.any_ip = any(a in WILDCARDS for a in allowed)
        self.names = {self._name(a) for a in allowed if a not in WILDCARDS and a != "*"}

    @staticmethod
    def _name(host: str) -> str:
        return host.strip().strip("[]").rstrip(".").lower()

    def allows(self, hostname: str | None) -> bool:
        if self.any:
            return True
        if not hostname:
            return False
        name = self._name(hostname)
        if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: always loopback
            return True
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            return name in self.names
        return ip.is_loopback or self.any_ip or str(ip) in self.names or name in self.names


def _hostname(authority: str) -> str | None:
    """The host of `Host:`'s value (port and IPv6 brackets removed); None if malformed."""
    try:
        parts = urlsplit("//" + authority)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        return None
    return parts.hostname


class CheckHost:
    """403 for a request whose Host or Origin names a host that is not allowed."""

    def __init__(self, app: ASGIApp, hosts: Hosts) -> None:
        self.app, self.hosts = app, hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.hosts.any:
            why = self._refusal(scope)
            if why:
                await send_json(send, 403, error_body(why, "forbidden"))
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> str | None:
        headers = [(k, v.decode("latin-1")) for k, v in scope["headers"]]
        host = next((v for k, v in headers if k == b"host"), None)
        if host is not None and not self.hosts.allows(_hostname(host)):
            return (f"Host {clip(host, 200)!r} is not allowed: this server answers to "
                    "localhost and its own address; start it with --allow-host NAME to "
                    "serve NAME (a guard against DNS rebinding)")
        origin = next((v for k, v in headers if k == b"origin"), None)
        if origin is not None and not self.hosts.allows(_origin_host(origin)):
            return (f"Origin {clip(origin, 200)!r} is not allowed: pages of other sites may "
                    "not use this server; start it with --allow-host NAME to let NAME's pages")
        return None


def _origin_host(origin: str) -> str | None:
    if origin == "null":  # a sandboxed page or a file: no host to allow (unless "*")
        return None
    try:
        return urlsplit(origin).hostname
    except ValueError:
        return None


class RequireKey:
    """The bearer key (constant-time compare) on everything but OPEN; exactly one
    Authorization header, so that no two parts of a chain of proxies read different keys."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        check_key(key)
        self.app = app
        self.digest = hashlib.sha256(key.encode()).digest() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.digest and scope["type"] == "http" and scope["path"] not in OPEN:
            given = [v for k, v in scope["headers"] if k == b"authorization"]
            if len(given) > 1:
                await send_json(send, 400, error_body(
                    f"{len(given)} Authorization headers: send exactly one",
                    "invalid_request_error"))
                return
            scheme, _, token = (given[0] if given else b"").decode("latin-1").partition(" ")
            digest = hashlib.sha256(token.strip().encode("latin-1")).digest()
            if scheme.lower() != "bearer" or not secrets.compare_digest(digest, self.digest):
                await send_json(send, 401, protocol.unauthorized_body(),
                                [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)
