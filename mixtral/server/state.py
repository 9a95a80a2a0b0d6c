"""What the server knows and how it says no: its settings, its state (the engine once loaded,
the answers being streamed), its Prometheus metrics, and `APIError`, the one way a route
refuses a request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mixtral import memory
from mixtral.completion import TextJob
from mixtral.engine import Engine
from mixtral.generate import TokenConstraint
from mixtral.model import Runner
from mixtral.server.protocol import clip
from mixtral.tokenizer import Tokenizer, default_tokenizer

ConstraintFactory = Callable[[dict[str, Any] | None], TokenConstraint]


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        message = clip(message)  # it may quote the request, which can be megabytes
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.headers = headers


class ErrorJSON(JSONResponse):
    """Error bodies as ASCII JSON: what they quote of a request (a name, a field's path) may
    hold lone surrogates, which UTF-8 cannot encode but a \\u escape can."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


@dataclass
class Settings:
    name: str  # the loaded model's own id
    api_key: str | None = None
    max_queue: int = 16
    max_batch: int = 8  # sequences decoded together
    max_seq_len: int | None = None  # per sequence (KV cache slots); None: the model's context
    keepalive_s: float = 10.0  # SSE comment when no token came for this long
    max_body_bytes: int = 8 * 2**20
    description: str = "Mixtral 8x7B"
    # who may connect (exposure.py): Host/Origin names beyond localhost's; "*": any
    allow_hosts: tuple[str, ...] = ()
    # what connections may hold (connections.py): beyond max_connections the longest-idle
    # is closed, or new requests get 503 while all are busy
    max_connections: int = 256
    keep_alive_s: float = 5.0  # an idle connection between requests
    header_timeout_s: float = 10.0  # from connecting (or the last answer) to a whole head
    body_timeout_s: float = 30.0  # for the whole body, once the head has arrived
    max_header_bytes: int = 16 * 1024
    # bytes of finished requests' KV kept for prompt reuse (0: none; None: `prefix_budget`)
    prefix_cache: int | None = None
    kv_copies: bool = True  # False under --tp/--ep: the other ranks' caches are out of reach

    def __post_init__(self) -> None:
        check_key(self.api_key)
        for name in ("max_connections", "keep_alive_s", "header_timeout_s", "body_timeout_s",
                     "max_header_bytes"):
            if not getattr(self, name) > 0:  # named as `mixtral serve` spells it
                flag = "--" + name.removesuffix("_s").replace("_", "-")
                raise ValueError(f"{flag} must be positive, got {getattr(self, name)}")

    def engine(self, model: Runner, thread: bool = True) -> Engine:
        """The engine these settings describe, over a loaded model."""
        engine = Engine(model, self.max_queue, self.max_batch, self.max_seq_len, thread=thread,
                        prefix_cache=self.prefix_cache or 0, kv_copies=self.kv_copies)
        if self.prefix_cache is None and self.kv_copies:  # sized with the KV cache allocated
            engine.prefixes.budget = prefix_budget()
        return engine


DEFAULT_PREFIX_CACHE = 2 * 2**30


def prefix_budget() -> int:
    """The prefix cache's default size: a quarter of the memory still available once the
    model and the engine's KV cache are in, at most 2 GiB (2 GiB where no limit is known)."""
    free = memory.available()
    return DEFAULT_PREFIX_CACHE if free is None else min(DEFAULT_PREFIX_CACHE, free[0] // 4)


def check_key(key: str | None) -> None:
    """ValueError for a key that cannot work: empty (it would silently mean no key) or not
    printable ASCII (HTTP headers carry nothing else reliably)."""
    if key is None:
        return
    if not key:
        raise ValueError("the API key is empty: give a key, or none at all for an open server "
                         "(and unset MIXTRAL_API_KEY)")
    if not all("!" <= c <= "~" for c in key):
        raise ValueError("the API key must be printable ASCII without spaces (an HTTP header "
                         "carries no other characters reliably)")


class Cut:
    """Put in an answer's event queue when the shutdown's grace period is over."""


@dataclass
class State:
    settings: Settings
    engine: Engine | None = None
    tokenizer: Tokenizer = field(default_factory=default_tokenizer)
    json_constraint: ConstraintFactory | None = None
    load_error: str | None = None
    planners: anyio.CapacityLimiter | None = None  # threads that plan requests (planning.py)
    answers: set[asyncio.Queue[Any]] = field(default_factory=set)  # event queues being read
    draining: bool = False  # shutting down: what still runs is cut at the grace deadline

    def cut(self) -> None:
        """The grace period is over: every answer still being read ends now (on the loop)."""
        for events in self.answers:
            events.put_nowait(Cut())

    def ready(self) -> Engine:
        """The engine, or a 503 that says why there is none to use."""
        if self.load_error:
            raise APIError(503, f"the model failed to load: {self.load_error}",
                           "service_unavailable")
        if self.engine is None:
            raise APIError(503, "the model is still loading; retry shortly",
                           "service_unavailable", headers={"Retry-After": "5"})
        if why := self.engine.failure:
            raise APIError(503, f"the engine is not running: {why}", "service_unavailable")
        return self.engine


class Metrics:
    def __init__(self, state: State) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mixtral_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("mixtral_prompt_tokens", "prompt tokens", registry=r)
        self.completion_tokens = Counter("mixtral_completion_tokens", "generated tokens",
                                         registry=r)
        self.ttft = Histogram("mixtral_time_to_first_token_seconds", "request to first token",
                              registry=r, buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.tps = Histogram("mixtral_decode_tokens_per_second", "decode speed per request",
                             registry=r, buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500))
        queue = Gauge("mixtral_queue_depth", "requests waiting for the engine", registry=r)
        queue.set_function(lambda: state.engine.queue_depth if state.engine else 0)
        running = Gauge("mixtral_requests_running", "requests generating now", registry=r)
        running.set_function(lambda: int(state.engine.busy) if state.engine else 0)
        kept = Gauge("mixtral_prefix_cache_bytes", "KV kept for prompt reuse", registry=r)
        kept.set_function(lambda: state.engine.prefixes.used if state.engine else 0)

    def answered(self, answer: TextJob, queued_at: float) -> None:
        """One choice's latency, speed and tokens, once it has ended (times: monotonic)."""
        first, end, n = answer.first_token_at, answer.ended_at, answer.tokens
        if first is not None:
            self.ttft.observe(first - queued_at)
        if first is not None and end is not None and n > 1:
            self.tps.observe((n - 1) / max(end - first, 1e-9))
        self.completion_tokens.inc(n)
