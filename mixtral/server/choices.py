"""A plan's n choices on the engine, and their answers as one JSON body or as an SSE stream.

Each choice is an engine job whose `completion.TextJob` turns ids into text deltas on the
engine's thread and hands them to the event loop. All n are queued at once, before the
response starts (429 rather than a 200 that then says it was refused), and every way a
response can end — done, an error, the client gone, the shutdown's grace deadline (503, or
in a stream an error event) — cancels the jobs still running. Every stream ends with
`data: [DONE]`, after an error event too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from mixtral.completion import Delta, TextJob
from mixtral.jobs import EngineDown, Job, QueueFull
from mixtral.sampling import TokenLogprob
from mixtral.server import logprobs, protocol
from mixtral.server.planning import Plan
from mixtral.server.state import APIError, Cut, Metrics, State

log = logging.getLogger("mixtral.server")


@dataclass
class Failed:
    """The engine's fault on one choice (its details stay in the server's log)."""
    error: BaseException


@dataclass
class Choice:
    """One answer being generated: its engine job and the deltas arriving from it."""
    index: int
    plan: Plan
    job: Job
    answer: TextJob
    events: asyncio.Queue[Delta | Failed | Cut]
    queued_at: float
    live: set[asyncio.Queue[Any]]  # the state's answers being read, where `events` is listed
    # the prompt's own logprobs, when this choice asked for them: set on the engine's thread
    # before its first id, so they are here once its first delta (or its end) is
    prompt_logprobs: list[TokenLogprob] | None = None

    def end(self) -> None:
        self.job.cancel()  # a no-op for a job that ended; frees its slot at once otherwise
        self.live.discard(self.events)


def _choice(plan: Plan, st: State, index: int, number: int,
            prompt_logprobs: int | None = None) -> Choice:
    """One choice's engine job, not yet queued: choice `index` of `plan`, `number` of the
    response (the plans of a request's prompts number their choices one after another).
    `prompt_logprobs`: the first choice scores the prompt (the others share its prefill)."""
    engine = st.ready()
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Delta | Failed | Cut] = asyncio.Queue()
    params = plan.params
    if plan.n > 1 and params.seed is not None:  # n different answers, still reproducible
        params = replace(params, seed=params.seed + index)

    def put(item: Delta | Failed) -> None:  # from the engine's thread
        loop.call_soon_threadsafe(events.put_nowait, item)

    answer = TextJob(st.tokenizer, len(plan.prompt), params.stop_ids, plan.stop,
                     plan.prefix_ids, emit=put, fail=lambda e: put(Failed(e)))
    try:
        job = engine.job(plan.prompt, params, answer.on_token, answer.on_done,
                         plan.constraints[index] if plan.constraints else None)
    except ValueError as e:
        raise APIError(400, str(e), code="3210") from None
    answer.job = job
    if params.logprobs is not None:
        job.on_logprob = answer.on_logprob
    choice = Choice(number, plan, job, answer, events, time.monotonic(), st.answers)
    if prompt_logprobs is not None and index == 0:
        job.prompt_logprobs = prompt_logprobs
        job.on_prompt_logprobs = lambda entries: setattr(choice, "prompt_logprobs", entries)
    return choice


def reserve(plans: list[Plan], st: State, prompt_logprobs: int | None = None) -> list[Choice]:
    """Queue the n choices of every plan at once: 429 (with Retry-After) when the queue cannot
    take them all. `prompt_logprobs`: each plan's first choice gets its prompt's logprobs with
    that many alternatives."""
    pairs = [(plan, i) for plan in plans for i in range(plan.n)]
    choices = [_choice(plan, st, i, number, prompt_logprobs)
               for number, (plan, i) in enumerate(pairs)]
    try:
        st.ready().enqueue([c.job for c in choices])
    except QueueFull as e:
        raise APIError(429, f"Rate limit exceeded: {e}", "rate_limited", "1300",
                       headers={"Retry-After": "2"}) from None
    except EngineDown as e:
        raise APIError(503, f"the engine is not running: {e}", "service_unavailable") from None
    st.answers.update(c.events for c in choices)  # cut at the shutdown's deadline (State.cut)
    return choices


def cancel(choices: list[Choice]) -> None:
    for choice in choices:
        choice.end()


class EventStream(StreamingResponse):
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
            cancel(self.choices)


async def deltas(choice: Choice, metrics: Metrics,
                  keepalive_s: float | None) -> AsyncIterator[Delta | None]:
    """One choice's deltas as they come, None when none came for `keepalive_s`, ending with
    the one that carries the finish reason. Closing the iterator cancels the job."""
    try:
        while True:
            try:
                event = await asyncio.wait_for(choice.events.get(), keepalive_s)
            except asyncio.TimeoutError:
                yield None
                continue
            if isinstance(event, Failed):  # an engine fault: log it, tell the client less
                log.error("generation failed", exc_info=event.error)
                raise APIError(500, "internal error during generation", "internal_error", "500")
            if isinstance(event, Cut):
                raise APIError(503, "the server is shutting down: the answer was cut at the end "
                               "of its grace period", "service_unavailable")
            yield event
            if event.finish_reason is not None:
                metrics.answered(choice.answer, choice.queued_at)
                return
    finally:
        choice.end()


@dataclass
class Answer:
    """One choice's whole answer, as `collect_one` gathers it."""
    text: str
    finish_reason: str
    completion_tokens: int
    logprobs: list[TokenLogprob]


async def collect_one(choice: Choice, metrics: Metrics) -> Answer:
    parts, last, entries = [choice.plan.prefix], Delta("", "length"), []
    async for delta in deltas(choice, metrics, None):
        if delta is not None:
            parts.append(delta.text)
            entries += delta.logprobs
            last = delta
    return Answer("".join(parts), last.finish_reason or "length", last.completion_tokens,
                  entries)


async def collect(plan: Plan, metrics: Metrics, choices: list[Choice],
                  st: State) -> dict[str, Any]:
    try:
        answers = [await collect_one(choice, metrics) for choice in choices]
    finally:  # an error or a disconnect: the choices not yet read must not run on
        cancel(choices)
    wanted = plan.params.logprobs is not None
    body = protocol.completion_response(
        plan.id, plan.created, plan.model,
        [(a.text, a.finish_reason, logprobs.chat(st.tokenizer, a.logprobs) if wanted else None)
         for a in answers],
        len(plan.prompt), sum(a.completion_tokens for a in answers))
    body["usage"] = usage(plan, choices, body["usage"]["completion_tokens"])
    return body


def usage(plan: Plan, choices: list[Choice], completion: int) -> dict[str, Any]:
    """The counts, and as OpenAI reports them the prompt tokens reused from earlier requests
    (the prefix cache; the first choice's: the others share its prefill)."""
    return {**protocol.usage(len(plan.prompt), completion),
            "prompt_tokens_details": {"cached_tokens": choices[0].job.cached_tokens}}


def event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def sse(plan: Plan, metrics: Metrics, choices: list[Choice], keepalive_s: float,
              st: State) -> AsyncIterator[bytes]:
    wanted = plan.params.logprobs is not None

    def chunk(delta: dict[str, Any], index: int, finish: str | None = None,
              use: dict[str, int] | None = None, entries: Sequence[TokenLogprob] = ()) -> bytes:
        lp = logprobs.chat(st.tokenizer, list(entries)) if wanted else None
        return event(protocol.chunk(plan.id, plan.created, plan.model, delta, index, finish, use,
                                     lp))

    total = 0
    with stream_errors(choices) as tail:
        for choice in choices:
            i = choice.index
            yield chunk({"role": "assistant", "content": ""}, i)
            # each content chunk is sent once the next is known, so the last carries the usage
            held, held_lp = plan.prefix, list[TokenLogprob]()
            async for delta in deltas(choice, metrics, keepalive_s):
                if delta is None:
                    yield b": ping\n\n"
                elif delta.finish_reason is None:
                    if held:
                        yield chunk({"content": held}, i, entries=held_lp)
                    held, held_lp = delta.text, delta.logprobs
                else:
                    total += delta.completion_tokens
                    last = i == plan.n - 1
                    yield chunk({"content": held + delta.text}, i, delta.finish_reason,
                                usage(plan, choices, total) if last else None,
                                held_lp + delta.logprobs)
        if plan.include_usage:
            yield event({"id": plan.id, "object": "chat.completion.chunk",
                          "created": plan.created, "model": plan.model, "choices": [],
                          "usage": usage(plan, choices, total)})
    for end in tail:
        yield end


@contextlib.contextmanager
def stream_errors(choices: list[Choice]) -> Iterator[list[bytes]]:
    """Around a stream's body: an error raised in it becomes an error event (after the 200 went
    out, errors travel in the stream), the choices are cancelled however it ends, and the
    events to send last — the error's, then `data: [DONE]`, which ends every stream — are left
    in the list it gives (not when the client left: nothing is sent then)."""
    tail: list[bytes] = []
    try:
        yield tail
    except APIError as e:
        tail.append(event({"error": {"message": e.message, "type": e.type, "param": None,
                                     "code": e.code}}))
    except Exception as e:
        log.error("stream failed", exc_info=e)
        tail.append(event({"error": {"message": "internal error during generation",
                                     "type": "internal_error", "param": None, "code": "500"}}))
    finally:
        cancel(choices)
    tail.append(b"data: [DONE]\n\n")


async def until_disconnect(request: Request, work: Awaitable[dict[str, Any]]) -> dict[str, Any]:
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
