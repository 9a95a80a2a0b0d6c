"""`mixtral serve`: the Mistral chat API (and the OpenAI clients' view of it) over one engine.

request JSON -> protocol.ChatCompletionRequest -> chat.encode -> ids -> engine (worker thread)
-> ids -> completion.TextStream -> JSON or SSE. The web page at `/` uses the same API.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import secrets
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mixtral import chat
from mixtral.completion import TextStream
from mixtral.engine import Engine, EngineDown, Job, QueueFull
from mixtral.generate import GenerationParams, TokenConstraint
from mixtral.model import Runner
from mixtral.server import protocol
from mixtral.server.protocol import ChatCompletionRequest, clip, error_body, lone_surrogate
from mixtral.tokenizer import Tokenizer, default_tokenizer

log = logging.getLogger("mixtral.server")
ConstraintFactory = Callable[[dict[str, Any] | None], TokenConstraint]
Handler = Callable[..., Awaitable[Any]]


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        message = clip(message)  # it may quote the request, which can be megabytes
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.headers = headers


class _ErrorJSON(JSONResponse):
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


@dataclass
class State:
    settings: Settings
    engine: Engine | None = None
    tokenizer: Tokenizer = field(default_factory=default_tokenizer)
    json_constraint: ConstraintFactory | None = None
    load_error: str | None = None


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


def create_app(load: Callable[[], Runner] | None, settings: Settings,
               json_constraint: ConstraintFactory | None = None) -> FastAPI:
    """The ASGI app. `load` runs in a thread at start-up (the engine gets its own thread);
    until it returns, the API says 503. With load=None the caller loads the model and sets
    `app.state.mixtral.engine` itself (see `serve`)."""
    state = State(settings, json_constraint=json_constraint)
    metrics = Metrics(state)

    def start(load: Callable[[], Runner]) -> None:
        try:
            state.engine = Engine(load(), settings.max_queue, settings.max_batch,
                                  settings.max_seq_len)
        except Exception as e:  # reported by /health and every API call
            state.load_error = f"{type(e).__name__}: {e}"

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if load is not None:
            threading.Thread(target=start, args=(load,), name="mixtral-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.stop(timeout=5)

    app = FastAPI(title="mixtral", version="0.1.0", lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.state.mixtral = state
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _ErrorJSON(error_body(exc.message, exc.type, exc.code), exc.status,
                          headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{"type": e.get("type"), "loc": list(e.get("loc", ())), "msg": e.get("msg")}
                  for e in exc.errors()]
        return _ErrorJSON(error_body({"detail": detail}, "invalid_request_error",
                                     detail=detail), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _ErrorJSON(error_body(str(exc.detail), "invalid_request_error"),
                          exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("request failed", exc_info=exc)  # the details stay in the server's log
        return _ErrorJSON(error_body("internal error", "internal_error"), 500)

    def ready() -> State:
        if state.load_error:
            raise APIError(503, f"the model failed to load: {state.load_error}",
                           "service_unavailable")
        if state.engine is None:
            raise APIError(503, "the model is still loading; retry shortly",
                           "service_unavailable", headers={"Retry-After": "5"})
        if why := state.engine.failure:
            raise APIError(503, f"the engine is not running: {why}", "service_unavailable")
        return state

    def names() -> list[str]:
        return [settings.name, *[a for a in protocol.ALIASES if a != settings.name]]

    def context() -> int:
        return state.engine.context if state.engine else 32768

    def get(path: str, **options: Any) -> Callable[[Handler], Handler]:
        """A GET route that answers HEAD too (load balancers and uptime checks probe with it);
        the HEAD twin stays out of the OpenAPI schema, where it would repeat the GET."""
        def register(handler: Handler) -> Handler:
            app.add_api_route(path, handler, methods=["HEAD"],
                              **{**options, "include_in_schema": False})
            return app.get(path, **options)(handler)

        return register

    @get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("mixtral.server").joinpath("static/index.html").read_text()
        return HTMLResponse(html)

    @get("/health")
    async def health() -> JSONResponse:
        if state.load_error:
            return JSONResponse({"status": "error", "error": state.load_error}, 503)
        if state.engine is None:
            return JSONResponse({"status": "loading"}, 503)
        if why := state.engine.failure:  # a server that would hang every request is not ok
            return JSONResponse({"status": "error", "error": why}, 503)
        return JSONResponse({"status": "ok", "model": settings.name})

    @get("/metrics", include_in_schema=False)
    async def metrics_route() -> Response:
        return Response(generate_latest(metrics.registry),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @get("/v1/models")
    async def list_models() -> dict[str, Any]:
        all_names = names()
        return {"object": "list",
                "data": [protocol.model_card(n, [a for a in all_names if a != n], context(),
                                             settings.description) for n in all_names]}

    @get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        all_names = names()
        if model_id not in all_names:
            raise APIError(404, f"Invalid model: {model_id}", "invalid_model", "1500")
        return protocol.model_card(model_id, [a for a in all_names if a != model_id], context(),
                                   settings.description)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest,
                               request: Request) -> JSONResponse | StreamingResponse:
        if where := lone_surrogate(body.model_dump(by_alias=True)):
            raise APIError(400, f"{where}: not valid Unicode text (it holds a lone surrogate "
                           "escape such as \\ud800)")
        st = ready()
        assert st.engine is not None
        if body.model not in names():
            raise APIError(404, f"Invalid model: {body.model}", "invalid_model", "1500")
        plan = _plan(body, st)
        choices = _reserve(plan, st)  # 429 now, before any byte of a 200 is sent
        metrics.prompt_tokens.inc(len(plan.prompt))
        if body.stream:
            return _EventStream(_sse(plan, st, metrics, choices, settings.keepalive_s), choices)
        result = await _until_disconnect(request, _collect(plan, st, metrics, choices))
        return JSONResponse(result)

    app.add_middleware(_CountRequests, metrics=metrics)
    app.add_middleware(_LimitBody, limit=settings.max_body_bytes)
    app.add_middleware(_RequireKey, key=settings.api_key)
    return app


def serve(load: Callable[[], Runner], settings: Settings, host: str, port: int,
          grace: float, json_constraint: ConstraintFactory | None = None) -> int:
    """Serve until SIGTERM/Ctrl-C: the web server on a thread (503 while the model loads), the
    model loaded and the engine run on this (the main) thread, where PyTorch's CPU kernels are
    fastest. On a signal the web server stops accepting, gives in-flight requests `grace`
    seconds, cancels the rest and the engine stops; returns 0. A model that fails to load
    stops the web server and re-raises."""
    import uvicorn

    app = create_app(None, settings, json_constraint)
    state: State = app.state.mixtral
    config = uvicorn.Config(app, host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=math.ceil(grace))
    server = uvicorn.Server(config)  # off the main thread it installs no signal handlers
    web = threading.Thread(target=server.run, name="mixtral-http")
    web.start()

    def on_signal(sig: int, frame: object) -> None:
        if server.should_exit and sig == signal.SIGINT:
            server.force_exit = True  # a second Ctrl-C: do not wait for the grace period
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        model = load()
    except Exception as e:  # nothing to serve: say why, stop the web server, fail
        state.load_error = f"{type(e).__name__}: {e}"
        server.should_exit = True
        web.join()
        raise
    engine = Engine(model, settings.max_queue, settings.max_batch, settings.max_seq_len,
                    thread=False)
    state.engine = engine
    try:
        if web.is_alive() and not server.should_exit:
            engine.run()  # returns when the app's shutdown stops the engine
    except BaseException:  # the engine crashed: stop serving (and exit non-zero), not hang
        server.should_exit = True
        raise
    finally:
        engine.stop()
        web.join()
    return 0


def json_constraints() -> ConstraintFactory:
    """JSON mode's grammar engine for the default tokenizer (built once, ~0.1 s)."""
    from mixtral.grammar import json_constraint_factory

    return json_constraint_factory(default_tokenizer())


# --- one request ---------------------------------------------------------------------------------

@dataclass
class Plan:
    """A validated request, as ids and settings."""
    id: str
    created: int
    model: str
    prompt: list[int]
    params: GenerationParams
    stop: tuple[str, ...]
    n: int
    prefix: str  # an assistant prefix being continued: the answer starts with it
    prefix_ids: list[int]
    json_schema: dict[str, Any] | None
    json_mode: bool
    include_usage: bool
    constraint: TokenConstraint | None = None  # choice 0's, built early to check the schema


def _plan(body: ChatCompletionRequest, st: State) -> Plan:
    if body.tools:
        raise APIError(400, "tools are not supported: Mixtral-8x7B's v1 tokenizer has no "
                       "function-calling format", code="3051")
    if body.logprobs:
        raise APIError(400, "logprobs are not supported by this server", code="3051")
    messages = [m.as_chat() for m in body.messages]
    if not messages:  # checked before the safe prompt could make the list non-empty
        raise APIError(400, "Conversation must have at least one message",
                       "invalid_request_message_order", "3230")
    try:
        prompt = chat.encode(messages, body.safe_prompt or body.safe_mode, st.tokenizer)
    except chat.ChatError as e:
        raise APIError(400, str(e).removeprefix("invalid conversation: "),
                       "invalid_request_message_order", "3230") from None
    last = body.messages[-1]
    prefix = ""
    if last.role == "assistant" and last.prefix:
        prefix = messages[-1]["content"] if isinstance(messages[-1]["content"], str) else \
            "\n\n".join(c["text"] for c in messages[-1]["content"] if c["text"])
    temperature = 0.7 if body.temperature is None else body.temperature
    if body.top_p == 0:
        temperature = 0.0  # nothing but the most likely token
    params = GenerationParams(
        max_tokens=body.max_new_tokens, temperature=temperature, top_p=body.top_p or 1.0,
        seed=body.sampling_seed, min_tokens=body.min_tokens or 0,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        stop_ids=(st.tokenizer.eos_id,))
    assert st.engine is not None
    try:
        st.engine.check(prompt, params)
    except ValueError as e:
        raise APIError(400, str(e), code="3210") from None
    fmt = body.response_format
    json_mode = fmt is not None and fmt.type != "text"
    if json_mode and st.json_constraint is None:
        raise APIError(400, "JSON mode is not available on this server", code="3051")
    plan = Plan(
        id=protocol.new_id(), created=protocol.now(), model=body.model, prompt=prompt,
        params=params, stop=body.stop_strings, n=body.n or 1, prefix=prefix,
        prefix_ids=st.tokenizer.encode(prefix, bos=False) if prefix else [],
        json_schema=fmt.json_schema.schema_ if fmt is not None and fmt.json_schema else None,
        json_mode=json_mode,
        include_usage=bool(body.stream_options and body.stream_options.include_usage))
    plan.constraint = _constraint(plan, st)
    return plan


@dataclass
class _Done:
    error: BaseException | None


_KEEPALIVE = object()


@dataclass
class Choice:
    """One answer being generated: its engine job and the ids arriving from it."""
    index: int
    job: Job
    events: asyncio.Queue[int | _Done]


def _choice(plan: Plan, st: State, index: int) -> Choice:
    """One choice's engine job, not yet queued; 400 for a bad schema."""
    assert st.engine is not None
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[int | _Done] = asyncio.Queue()
    params = plan.params
    if plan.n > 1 and params.seed is not None:  # n different answers, still reproducible
        params = replace(params, seed=params.seed + index)
    constraint = plan.constraint if index == 0 else _constraint(plan, st)
    try:
        job = st.engine.job(plan.prompt, params,
                            lambda t: loop.call_soon_threadsafe(events.put_nowait, t),
                            lambda e: loop.call_soon_threadsafe(events.put_nowait, _Done(e)),
                            constraint)
    except ValueError as e:
        raise APIError(400, str(e), code="3210") from None
    return Choice(index, job, events)


def _reserve(plan: Plan, st: State) -> list[Choice]:
    """Queue all n choices at once, before the response starts: 429 (with Retry-After) when
    the queue cannot take them all, rather than a 200 whose stream then says it was refused."""
    assert st.engine is not None
    choices = [_choice(plan, st, i) for i in range(plan.n)]
    try:
        st.engine.enqueue([c.job for c in choices])
    except QueueFull as e:
        raise _queue_full(str(e)) from None
    except EngineDown as e:
        raise APIError(503, f"the engine is not running: {e}", "service_unavailable") from None
    return choices


def _cancel(choices: list[Choice]) -> None:
    for choice in choices:
        choice.job.cancel()  # a no-op for a job that ended; frees its slot at once otherwise


class _EventStream(StreamingResponse):
    """The SSE response of reserved choices, cancelled however the response ends — even when
    the client left before the first byte, and the body's generator never started."""

    def __init__(self, events: AsyncIterator[bytes], choices: list[Choice]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.choices = choices

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            _cancel(self.choices)


def _queue_full(why: str) -> APIError:
    return APIError(429, f"Rate limit exceeded: {why}", "rate_limited", "1300",
                    headers={"Retry-After": "2"})


def _constraint(plan: Plan, st: State) -> TokenConstraint | None:
    if not plan.json_mode:
        return None
    assert st.json_constraint is not None
    try:
        return st.json_constraint(plan.json_schema)
    except ValueError as e:
        raise APIError(400, f"response_format: {e}", code="3051") from None


async def _run(plan: Plan, st: State, metrics: Metrics, choice: Choice,
               keepalive_s: float | None) -> AsyncIterator[Any]:
    """Yield text deltas (str) for one choice, keep-alive markers when idle, and finally a
    (finish_reason, completion_tokens) tuple. Closing the iterator cancels the job."""
    text = TextStream(st.tokenizer, plan.stop, plan.prefix_ids)
    start, first, n, finish = time.monotonic(), 0.0, 0, "length"
    try:
        while True:
            try:
                event = await asyncio.wait_for(choice.events.get(), keepalive_s)
            except asyncio.TimeoutError:
                yield _KEEPALIVE
                continue
            if isinstance(event, _Done):
                if event.error is not None:  # an engine fault: log it, tell the client less
                    log.error("generation failed", exc_info=event.error)
                    raise APIError(500, "internal error during generation", "internal_error",
                                   "500")
                break
            n += 1
            if n == 1:
                first = time.monotonic()
                metrics.ttft.observe(first - start)
            if event in plan.params.stop_ids:
                finish = "stop"
                break
            delta = text.push(event)
            if delta:
                yield delta
            if text.stopped:
                finish = "stop"
                break
        if finish == "length" and (tail := text.finish()):
            yield tail
        if n > 1:
            metrics.tps.observe((n - 1) / max(time.monotonic() - first, 1e-9))
        metrics.completion_tokens.inc(n)
        yield (finish, n)
    finally:
        choice.job.cancel()  # a no-op when it already ended; frees the slot at once otherwise


async def _collect(plan: Plan, st: State, metrics: Metrics,
                   choices: list[Choice]) -> dict[str, Any]:
    answers, total = [], 0
    try:
        for choice in choices:
            parts, finish = [plan.prefix], "length"
            async for item in _run(plan, st, metrics, choice, None):
                if isinstance(item, str):
                    parts.append(item)
                elif isinstance(item, tuple):
                    finish, n = item
                    total += n
            answers.append(("".join(parts), finish))
    finally:  # an error or a disconnect: the choices not yet read must not run on
        _cancel(choices)
    return protocol.completion_response(plan.id, plan.created, plan.model, answers,
                                        len(plan.prompt), total)


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _sse(plan: Plan, st: State, metrics: Metrics, choices: list[Choice],
               keepalive_s: float) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], index: int, finish: str | None = None,
              use: dict[str, int] | None = None) -> bytes:
        return _event(protocol.chunk(plan.id, plan.created, plan.model, delta, index, finish, use))

    total = 0
    try:
        for choice in choices:
            i = choice.index
            yield chunk({"role": "assistant", "content": ""}, i)
            held = plan.prefix  # each content chunk is sent once the next is known, so the
            # last one carries the usage
            async for item in _run(plan, st, metrics, choice, keepalive_s):
                if item is _KEEPALIVE:
                    yield b": ping\n\n"
                elif isinstance(item, str):
                    if held:
                        yield chunk({"content": held}, i)
                    held = item
                elif isinstance(item, tuple):
                    finish, n = item
                    total += n
                    last = i == plan.n - 1
                    yield chunk({"content": held}, i, finish,
                                protocol.usage(len(plan.prompt), total) if last else None)
        if plan.include_usage:
            yield _event({"id": plan.id, "object": "chat.completion.chunk",
                          "created": plan.created, "model": plan.model, "choices": [],
                          "usage": protocol.usage(len(plan.prompt), total)})
        yield b"data: [DONE]\n\n"
    except APIError as e:  # after the 200 went out, errors travel in the stream
        yield _event({"error": {"message": e.message, "type": e.type, "param": None,
                                "code": e.code}})
    except Exception as e:
        log.error("stream failed", exc_info=e)
        yield _event({"error": {"message": "internal error during generation",
                                "type": "internal_error", "param": None, "code": "500"}})
    finally:
        _cancel(choices)


async def _until_disconnect(request: Request, work: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """Run `work`, but cancel it (and with it the engine job) if the client goes away."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        raise APIError(499, "client disconnected", "client_closed_request")
    return task.result()


# --- middleware (pure ASGI: no BaseHTTPMiddleware, so disconnects reach the handlers) -----------

async def _send_json(send: Send, status: int, body: dict[str, Any],
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


class _RequireKey:
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
                await _send_json(send, 401, protocol.unauthorized_body(),
                                 [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


class _LimitBody:
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
                await _send_json(send, 413, error_body(
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


class _CountRequests:
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
            route = scope["path"] if scope["path"] in _ROUTES else "other"
            self.metrics.requests.labels(route, str(status)).inc()


_ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions"}
