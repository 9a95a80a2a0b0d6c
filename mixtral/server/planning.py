"""From a validated request to a `Plan`: its prompt ids, sampling settings, stop strings and
JSON constraints, or an `APIError` saying what in the request cannot be served.

Planning tokenizes the conversation and compiles JSON schemas: work that grows with the
request (a megabyte prompt took seconds), so `plan_off_loop` runs it on a few worker threads,
never on the event loop that answers every other connection. A prompt that cannot fit the
context is refused from its length alone, before any tokenizing (see `at_least_tokens`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import anyio
import sentencepiece
from fastapi.exceptions import RequestValidationError

from mixtral import chat
from mixtral.generate import GenerationParams, TokenConstraint
from mixtral.server import protocol
from mixtral.server.protocol import ChatCompletionRequest, Sampling, lone_surrogate
from mixtral.server.state import APIError, ConstraintFactory, State
from mixtral.tokenizer import Tokenizer, default_tokenizer

PLANNERS = 4  # requests planned at once; more wait their turn (on the loop, without blocking it)


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
    constraints: list[TokenConstraint | None] = field(default_factory=list)  # one per choice


async def plan_off_loop(body: ChatCompletionRequest, st: State, models: list[str]) -> Plan:
    """`plan` on a worker thread, at most PLANNERS at a time."""
    if st.planners is None:  # made here: anyio's limiter belongs to the running loop
        st.planners = anyio.CapacityLimiter(PLANNERS)
    return await anyio.to_thread.run_sync(plan, body, st, models, limiter=st.planners)


def check_text_and_model(fields: dict[str, Any], model: str, models: list[str]) -> None:
    """What every route checks first: no lone surrogate anywhere in the request (a 400 naming
    where), and a model this server answers to (Mistral's 404)."""
    if where := lone_surrogate(fields):
        raise APIError(400, f"{where}: not valid Unicode text (it holds a lone surrogate "
                       "escape such as \\ud800)")
    if model not in models:
        raise APIError(404, f"Invalid model: {model}", "invalid_model", "1500")


def plan(body: ChatCompletionRequest, st: State, models: list[str]) -> Plan:
    """The plan of a request for one of `models`; APIError if it cannot be served."""
    check_text_and_model(body.model_dump(by_alias=True), body.model, models)
    if body.tools:
        raise APIError(400, "tools are not supported: Mixtral-8x7B's v1 tokenizer has no "
                       "function-calling format", code="3051")
    messages = [m.as_chat() for m in body.messages]
    if not messages:  # checked before the safe prompt could make the list non-empty
        raise APIError(400, "Conversation must have at least one message",
                       "invalid_request_message_order", "3230")
    engine = st.ready()
    _fits_by_length(body, st.tokenizer, engine.context)
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
    params = sampling(body, body.max_new_tokens, 0.7, body.top_logprobs_count, st)
    check(prompt, params, st)
    fmt = body.response_format
    json_mode = fmt is not None and fmt.type != "text"
    if json_mode and st.json_constraint is None:
        raise APIError(400, "JSON mode is not available on this server", code="3051")
    result = Plan(
        id=protocol.new_id(), created=protocol.now(), model=body.model, prompt=prompt,
        params=params, stop=body.stop_strings, n=body.n or 1, prefix=prefix,
        prefix_ids=st.tokenizer.encode(prefix, bos=False) if prefix else [],
        json_schema=fmt.json_schema.schema_ if fmt is not None and fmt.json_schema else None,
        json_mode=json_mode,
        include_usage=bool(body.stream_options and body.stream_options.include_usage))
    # each choice follows the grammar on its own; choice 0's is built first, to check it
    result.constraints = [constraint(result, st) for _ in range(result.n)]
    return result


def sampling(body: Sampling, max_tokens: int | None, temperature: float,
             logprobs: int | None, st: State) -> GenerationParams:
    """The generation settings of a request; `temperature`: the route's default."""
    if body.temperature is not None:
        temperature = body.temperature
    if body.top_p == 0:
        temperature = 0.0  # nothing but the most likely token
    vocab = st.ready().model.args.vocab_size
    bias = tuple((int(k), v) for k, v in (body.logit_bias or {}).items())
    if wrong := [k for k, _ in bias if k >= vocab]:
        raise APIError(400, f"logit_bias: token id {wrong[0]} is outside the vocabulary "
                       f"[0, {vocab})", code="3051")
    return GenerationParams(
        max_tokens=max_tokens, temperature=temperature, top_p=body.top_p or 1.0,
        seed=body.sampling_seed, min_tokens=body.min_tokens or 0,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        stop_ids=(st.tokenizer.eos_id,), top_k=body.top_k, min_p=body.min_p,
        repetition_penalty=body.repetition_penalty, logit_bias=bias, logprobs=logprobs)


def check(prompt: list[int], params: GenerationParams, st: State) -> None:
    """400 when the engine cannot run `prompt` with `params` (the context, a bad id)."""
    try:
        st.ready().check(prompt, params)
    except ValueError as e:
        raise APIError(400, str(e), code="3210") from None


def mistral_limits(body: ChatCompletionRequest, user_agent: str) -> None:
    """A request in Mistral's own shape (its client, or its own fields) gets Mistral's bound on
    temperature, as a 422 like its API's: code written against this server then runs there."""
    limit = protocol.MISTRAL_TEMPERATURE_MAX
    if body.temperature is not None and body.temperature > limit and \
            body.mistral_shaped(user_agent):
        raise RequestValidationError([{
            "type": "less_than_equal", "loc": ("body", "temperature"),
            "msg": f"Input should be less than or equal to {limit} (Mistral's API; OpenAI's "
                   f"range, to {protocol.TEMPERATURE_MAX}, is for requests in OpenAI's shape)",
            "input": body.temperature, "ctx": {"le": limit}}])


def constraint(plan: Plan, st: State) -> TokenConstraint | None:
    """A fresh JSON constraint for one choice of `plan` (None outside JSON mode); 400 for a
    schema the grammar cannot follow."""
    if not plan.json_mode:
        return None
    assert st.json_constraint is not None
    try:
        return st.json_constraint(plan.json_schema)
    except ValueError as e:
        raise APIError(400, f"response_format: {e}", code="3051") from None
    except RecursionError:  # the schema checks walk it recursively
        raise APIError(400, "response_format: the schema is nested too deeply",
                       code="3051") from None


def _fits_by_length(body: ChatCompletionRequest, tokenizer: Tokenizer, context: int) -> None:
    """400 when the messages' length alone proves the prompt cannot fit the context."""
    per_token = longest_piece(tokenizer)
    if per_token is None:
        return
    texts = [text for m in body.messages if m.role in chat.ROLES for text in _texts(m.content)]
    tokens = at_least_tokens(texts, per_token)
    # prompt tokens that leave room for an answer; max_tokens beyond that room is left to the
    # engine's exact check, whose message counts the real tokens (and tokenizing such a
    # prompt costs at most `per_token` * context characters' worth)
    most = context if body.max_new_tokens == 0 else context - 1
    if tokens <= most:
        return
    chars = sum(len(t.strip()) for t in texts)  # what the bound counts
    raise APIError(400, f"the messages hold {chars} characters: at least {tokens} tokens (a "
                   f"token covers at most {per_token} characters), more than fit the model's "
                   f"context of {context} tokens", code="3210")


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    return [c.text for c in content or []]


def at_least_tokens(texts: list[str], per_token: int) -> int:
    """A lower bound on the prompt tokens of messages holding `texts`.

    Why it is sound: the tokenizer's normalizer is the identity (checked by `longest_piece`),
    so the text its pieces cover is each message's own text — spaces as "▁", plus the one
    "▁" it prefixes. mistral-common only strips whitespace at a message's ends before encoding
    it (an assistant message's trailing spaces), hence the strip. A piece covers at most
    `per_token` characters of that text; a byte-fallback piece covers part of one; control
    pieces (BOS, [INST]) cover none and only add tokens. So each text needs at least
    ceil(len / per_token) tokens. (Bytes bound nothing finer: a character is 1 to 4 bytes of
    UTF-8 but one to four byte pieces or part of a longer piece.)"""
    return sum(math.ceil(len(t.strip()) / per_token) for t in texts)


@lru_cache(maxsize=4)
def longest_piece(tokenizer: Tokenizer) -> int | None:
    """The most characters one piece of the vocabulary covers; None when the tokenizer
    normalizes text (NFKC can shorten it, collapsed spaces do), where no bound is sound."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer.model_file))
    probe = "a  b\u00a0\ufb03 e\u0301 \uff21 \u1100\u1161 x\t\n "  # NFKC would change all
    if sp.normalize(probe) != "\u2581" + probe.replace(" ", "\u2581"):
        return None
    return max(len(sp.id_to_piece(i)) for i in range(sp.get_piece_size()))


def json_constraints() -> ConstraintFactory:
    """JSON mode's grammar engine for the default tokenizer (built once, ~0.1 s)."""
    from mixtral.grammar import json_constraint_factory

    return json_constraint_factory(default_tokenizer())
