"""From a validated request to a `Plan`: its prompt ids, sampling settings, stop strings and
JSON constraint, or an `APIError` saying what in the request cannot be served."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mixtral import chat
from mixtral.generate import GenerationParams, TokenConstraint
from mixtral.server import protocol
from mixtral.server.protocol import ChatCompletionRequest
from mixtral.server.state import APIError, ConstraintFactory, State
from mixtral.tokenizer import default_tokenizer


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


def plan(body: ChatCompletionRequest, st: State) -> Plan:
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
    try:
        st.ready().check(prompt, params)
    except ValueError as e:
        raise APIError(400, str(e), code="3210") from None
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


def json_constraints() -> ConstraintFactory:
    """JSON mode's grammar engine for the default tokenizer (built once, ~0.1 s)."""
    from mixtral.grammar import json_constraint_factory

    return json_constraint_factory(default_tokenizer())
