"""`POST /v1/completions`: OpenAI's legacy text completion, a raw prompt with no chat template.

`prompt` is a string, a list of strings, a list of token ids or a list of such lists; each
prompt gets `n` choices, numbered prompt by prompt (choice i*n + j is prompt i's j-th), all
queued at once. A string is encoded with BOS, as vLLM and llama.cpp do; token ids are taken as
they are. OpenAI's defaults apply on this route (`max_tokens` 16, `temperature` 1). Mixtral has
no fill-in-the-middle, so a non-empty `suffix` is a 400. `echo` starts each choice's text with
its prompt; `logprobs` (0-20) gives the legacy shape (logprobs.py).

`echo` with `logprobs` also scores the prompt, as OpenAI's API did (and vLLM, llama.cpp): its
tokens come first in the logprobs, the first with null, each other with the model's logprob of
it given the ones before. `max_tokens` 0 then scores a text and generates nothing (what
lm-eval-harness's loglikelihood requests to such servers send). Each prompt's first choice
asks the engine for them, prefilling the whole prompt (no prefix cache: copied KV has no
logits); its other choices share that prefill and the same prompt logprobs. A stream sends the
echoed prompt and its logprobs in its first chunk, once the prompt is in.
"""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field, model_validator

from mixtral.server import choices, logprobs, planning, protocol
from mixtral.server.choices import Choice, EventStream
from mixtral.server.planning import Plan
from mixtral.server.protocol import SEED_MAX, Sampling
from mixtral.server.state import APIError, Metrics, State

MAX_PROMPTS = 32
MAX_CHOICES = 64  # prompts x n: queued as one group, all or none


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default; null: to the context's end
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1, le=8)

    @model_validator(mode="after")
    def _sizes(self) -> CompletionRequest:
        if not self.prompt:
            raise ValueError("prompt is empty: give a string, a list of strings or token ids")
        if len(self.prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
        if len(self.prompts) * (self.n or 1) > MAX_CHOICES:
            raise ValueError(f"prompts x n must be at most {MAX_CHOICES}")
        if self.seed is not None and self.seed + (self.n or 1) - 1 > SEED_MAX:
            raise ValueError("seed + n - 1 must be at most 2**64 - 1 (choice i samples with "
                             "seed + i)")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: its text, or its token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]  # one prompt of ids
        return list(p)  # type: ignore[arg-type]


async def plan_off_loop(body: CompletionRequest, st: State, models: list[str]) -> list[Plan]:
    if st.planners is None:
        st.planners = anyio.CapacityLimiter(planning.PLANNERS)
    return await anyio.to_thread.run_sync(plan, body, st, models, limiter=st.planners)


def plan(body: CompletionRequest, st: State, models: list[str]) -> list[Plan]:
    """One plan per prompt, sharing the response's id; APIError if it cannot be served."""
    planning.check_text_and_model(body.model_dump(), body.model, models)
    if body.suffix:
        raise APIError(400, "suffix is not supported: Mixtral 8x7B has no fill-in-the-middle "
                       "format (its v1 tokenizer has no [SUFFIX] or [PREFIX] token)",
                       code="3051")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise APIError(400, "best_of other than n is not supported: the server does not rank "
                       "candidates; ask for n choices instead", code="3051")
    engine = st.ready()
    id_, created = "cmpl-" + protocol.new_id(), protocol.now()
    params = planning.sampling(body, body.max_tokens, 1.0, body.logprobs, st)
    plans = []
    for prompt in body.prompts:
        if isinstance(prompt, str):
            per_token = planning.longest_piece(st.tokenizer)
            if per_token and planning.at_least_tokens([prompt], per_token) > engine.context:
                raise APIError(400, f"a prompt of {len(prompt)} characters cannot fit the "
                               f"model's context of {engine.context} tokens", code="3210")
        ids = st.tokenizer.encode(prompt, bos=True) if isinstance(prompt, str) else prompt
        planning.check(ids, params, st)  # the context; ids outside the vocabulary
        text = prompt if isinstance(prompt, str) else st.tokenizer.decode(ids)
        plans.append(Plan(
            id=id_, created=created, model=body.model, prompt=ids, params=params,
            stop=body.stop_strings, n=body.n or 1, prefix=text if body.echo else "",
            prefix_ids=ids[-8:],  # what the first piece follows: it keeps its leading space
            json_schema=None, json_mode=False,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            constraints=[None] * (body.n or 1)))
    return plans


def add_route(app: FastAPI, state: State, metrics: Metrics, names: Any,
              keepalive_s: float) -> None:
    """Register `POST /v1/completions` on `app`; `names()`: the model names served."""

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest,
                          request: Request) -> JSONResponse | StreamingResponse:
        state.ready()
        plans = await plan_off_loop(body, state, names())
        scored = body.logprobs if body.echo else None  # the prompt's own logprobs
        reserved = choices.reserve(plans, state, scored)  # 429 now, before any byte of a 200
        metrics.prompt_tokens.inc(sum(len(p.prompt) for p in plans))
        if body.stream:
            return EventStream(_sse(plans, metrics, reserved, keepalive_s, state), reserved)
        return JSONResponse(await choices.until_disconnect(
            request, _collect(plans, metrics, reserved, state)))


def _prompt_tokens(plans: list[Plan]) -> int:
    return sum(len(p.prompt) for p in plans)


def _usage(plans: list[Plan], reserved: list[Choice], completion: int) -> dict[str, Any]:
    """The counts, with the prompt tokens reused from earlier requests (the prefix cache) as
    OpenAI reports them: each prompt's first choice's (its other choices share that prefill)."""
    firsts = {id(c.plan): c for c in reversed(reserved)}
    return {**protocol.usage(_prompt_tokens(plans), completion),
            "prompt_tokens_details": {"cached_tokens": sum(c.job.cached_tokens
                                                           for c in firsts.values())}}


def _legacy(plan: Plan, st: State, entries: list[Any], offset: int) -> dict[str, Any] | None:
    if plan.params.logprobs is None:
        return None
    return logprobs.legacy(st.tokenizer, entries, offset)


def _first(c: Choice, reserved: list[Choice]) -> Choice:
    return next(x for x in reserved if x.plan is c.plan)


def _scored(c: Choice, reserved: list[Choice]) -> bool:
    """Whether c's logprobs start with its echoed prompt's (its plan's first choice asked)."""
    return _first(c, reserved).job.prompt_logprobs is not None


def _echoed(c: Choice, reserved: list[Choice], st: State) -> dict[str, Any]:
    """The legacy logprobs of c's echoed prompt, from its plan's first choice (which asked the
    engine for them; it has sent an id or ended by the time any choice of its plan is read)."""
    first = _first(c, reserved)
    if first.prompt_logprobs is None:  # ended before its prefill: no answer to give
        raise APIError(500, "internal error during generation", "internal_error", "500")
    return logprobs.echoed(st.tokenizer, c.plan.prompt, first.prompt_logprobs, c.plan.prefix)


async def _collect(plans: list[Plan], metrics: Metrics, reserved: list[Choice],
                   st: State) -> dict[str, Any]:
    try:
        answers = [await choices.collect_one(c, metrics) for c in reserved]
    finally:
        choices.cancel(reserved)
    first = plans[0]
    echoed = {id(c.plan): _echoed(c, reserved, st)  # once a prompt, for its n choices
              for c in reserved if c.job.prompt_logprobs is not None}

    def logprobs_of(c: Choice, a: choices.Answer) -> dict[str, Any] | None:
        answer = _legacy(c.plan, st, a.logprobs, len(c.plan.prefix))
        if answer is None or not _scored(c, reserved):
            return answer
        return logprobs.concat(echoed[id(c.plan)], answer)

    return {"id": first.id, "object": "text_completion", "created": first.created,
            "model": first.model,
            "choices": [{"index": c.index, "text": a.text, "finish_reason": a.finish_reason,
                         "logprobs": logprobs_of(c, a)}
                        for c, a in zip(reserved, answers, strict=True)],
            "usage": _usage(plans, reserved, sum(a.completion_tokens for a in answers))}


async def _sse(plans: list[Plan], metrics: Metrics, reserved: list[Choice], keepalive_s: float,
               st: State) -> Any:
    first = plans[0]

    def event(choice_list: list[dict[str, Any]], use: dict[str, Any] | None = None) -> bytes:
        return choices.event({"id": first.id, "object": "text_completion",
                              "created": first.created, "model": first.model,
                              "choices": choice_list, "usage": use})

    total = 0
    with choices.stream_errors(reserved) as errors:
        for c in reserved:
            offset, echo = len(c.plan.prefix), _scored(c, reserved)
            if c.plan.prefix and not echo:  # the echoed prompt, at once
                yield event([{"index": c.index, "text": c.plan.prefix, "logprobs": None,
                              "finish_reason": None}])
            async for delta in choices.deltas(c, metrics, keepalive_s):
                if delta is None:
                    yield b": ping\n\n"
                    continue
                if echo:  # the echoed prompt with its logprobs, now that the prompt is in
                    yield event([{"index": c.index, "text": c.plan.prefix,
                                  "logprobs": _echoed(c, reserved, st), "finish_reason": None}])
                    echo = False
                yield event([{"index": c.index, "text": delta.text,
                              "logprobs": _legacy(c.plan, st, delta.logprobs, offset),
                              "finish_reason": delta.finish_reason}])
                offset += len(delta.text)
                total += delta.completion_tokens
        if first.include_usage:
            yield event([], _usage(plans, reserved, total))
    for tail in errors:
        yield tail
