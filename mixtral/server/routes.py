"""`create_app`: the ASGI app — its routes, error handlers and middleware over one `State`.

request JSON -> protocol.ChatCompletionRequest -> planning.plan (ids) -> choices.reserve
(engine jobs) -> completion.TextJob (text) -> choices.collect (JSON) or choices.sse (SSE).
The other routes' own modules register them: completions.py, tokens.py; docs.py is /docs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from mixtral.model import Runner
from mixtral.quant import describe
from mixtral.server import choices, completions, docs, page, protocol, tokens
from mixtral.server.exposure import CheckHost, Hosts, RequireKey
from mixtral.server.middleware import CountRequests, LimitBody, OneFraming, QuietDrain
from mixtral.server.planning import mistral_limits, plan_off_loop
from mixtral.server.protocol import ChatCompletionRequest, error_body
from mixtral.server.state import APIError, ConstraintFactory, ErrorJSON, Metrics, Settings, State

log = logging.getLogger("mixtral.server")
Handler = Callable[..., Awaitable[Any]]


def create_app(load: Callable[[], Runner] | None, settings: Settings,
               json_constraint: ConstraintFactory | None = None) -> FastAPI:
    """The ASGI app. `load` runs in a thread at start-up (the engine gets its own thread);
    until it returns, the API says 503. With load=None the caller loads the model and sets
    `app.state.mixtral.engine` itself (see `host.serve`)."""
    state = State(settings, json_constraint=json_constraint)
    metrics = Metrics(state)

    def start(load: Callable[[], Runner]) -> None:
        try:
            state.engine = settings.engine(load())
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
    _errors(app)

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

    def card(name: str, all_names: list[str]) -> dict[str, Any]:
        facts = weights(state.engine.model) if state.engine else {}
        return {**protocol.model_card(name, [a for a in all_names if a != name], context(),
                                      settings.description), **facts}

    @get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        html, headers = page.page()
        return HTMLResponse(html, headers=headers)

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
        return {"object": "list", "data": [card(n, all_names) for n in all_names]}

    @get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        all_names = names()
        if model_id not in all_names:
            raise APIError(404, f"Invalid model: {model_id}", "invalid_model", "1500")
        return card(model_id, all_names)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest,
                               request: Request) -> JSONResponse | StreamingResponse:
        state.ready()
        mistral_limits(body, request.headers.get("user-agent", ""))
        planned = await plan_off_loop(body, state, names())
        reserved = choices.reserve([planned], state)  # 429 now, before any byte of a 200
        metrics.prompt_tokens.inc(len(planned.prompt))
        if body.stream:
            return choices.EventStream(choices.sse(planned, metrics, reserved,
                                                   settings.keepalive_s, state), reserved)
        result = await choices.until_disconnect(
            request, choices.collect(planned, metrics, reserved, state))
        return JSONResponse(result)

    completions.add_route(app, state, metrics, names, settings.keepalive_s)
    tokens.add_routes(app, state, names)

    @get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def reference() -> HTMLResponse:
        return HTMLResponse(docs.page(app.openapi()))

    # the last added runs first: framing, then who may ask, then the body
    app.add_middleware(CountRequests, metrics=metrics)
    app.add_middleware(LimitBody, limit=settings.max_body_bytes, timeout=settings.body_timeout_s)
    app.add_middleware(RequireKey, key=settings.api_key)
    app.add_middleware(CheckHost, hosts=Hosts(settings.allow_hosts))
    app.add_middleware(OneFraming)
    app.add_middleware(QuietDrain, state=state)
    return app


def weights(model: Runner) -> dict[str, Any]:
    """What the model card adds for the page: the parameters (all, and those one token
    uses), the compute dtype and the weight-only quantization the loaded modules carry."""
    facts = describe(model)
    quantization = facts["quantization"] and facts["quantization"]["format"]
    return {**{k: facts[k] for k in ("parameters", "active_parameters", "dtype")},
            "quantization": quantization}


def _errors(app: FastAPI) -> None:
    """Every error as the API's error body; a bug's details stay in the server's log."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return ErrorJSON(error_body(exc.message, exc.type, exc.code), exc.status,
                         headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{"type": e.get("type"), "loc": list(e.get("loc", ())), "msg": e.get("msg")}
                  for e in exc.errors()]
        return ErrorJSON(error_body({"detail": detail}, "invalid_request_error",
                                    detail=detail), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ErrorJSON(error_body(str(exc.detail), "invalid_request_error"),
                         exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("request failed", exc_info=exc)
        return ErrorJSON(error_body("internal error", "internal_error"), 500)
