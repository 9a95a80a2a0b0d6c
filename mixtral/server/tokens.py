"""`POST /v1/tokenize` and `/v1/detokenize` (also at `/tokenize`, `/detokenize`): the model's
own tokenizer over HTTP, in vLLM's shape with llama.cpp's names accepted too.

Tokenize takes `prompt` (llama.cpp: `content`), encoded with BOS unless `add_special_tokens`
(llama.cpp: `add_special`) is false, or `messages`, encoded with the chat template exactly as a
chat completion's prompt is. It answers `{"tokens", "count", "max_model_len"}`, plus
`token_strs` when `return_token_strs` is set; llama.cpp's `with_pieces` makes each token
`{"id", "piece"}`. Detokenize takes `tokens` and answers `{"prompt"}` (llama.cpp: `content`).
"""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mixtral import chat
from mixtral.server import logprobs, planning
from mixtral.server.protocol import Message, lone_surrogate
from mixtral.server.state import APIError, State


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    content: str | None = None  # llama.cpp's name
    messages: list[Message] | None = None
    add_special_tokens: bool | None = None
    add_special: bool | None = None  # llama.cpp's name
    add_generation_prompt: bool = True  # the template always ends in [/INST] (vLLM's field)
    safe_prompt: bool = False
    return_token_strs: bool = False
    with_pieces: bool = False  # llama.cpp's

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        given = [f for f in ("prompt", "content", "messages") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of prompt (or content) and messages, got "
                             f"{', '.join(given) or 'none'}")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


def tokenize(body: TokenizeRequest, st: State, models: list[str]) -> dict[str, Any]:
    _known(body.model, models)
    if where := lone_surrogate(body.model_dump()):
        raise APIError(400, f"{where}: not valid Unicode text (it holds a lone surrogate "
                       "escape such as \\ud800)")
    tok = st.tokenizer
    if body.messages is not None:
        try:
            ids = chat.encode([m.as_chat() for m in body.messages], body.safe_prompt, tok)
        except chat.ChatError as e:
            raise APIError(400, str(e).removeprefix("invalid conversation: "),
                           "invalid_request_message_order", "3230") from None
    else:
        special = body.add_special_tokens if body.add_special_tokens is not None else \
            body.add_special if body.add_special is not None else True
        ids = tok.encode(body.prompt if body.prompt is not None else body.content or "",
                         bos=special)
    out: dict[str, Any] = {"tokens": ids, "count": len(ids),
                           "max_model_len": st.ready().context}
    if body.with_pieces:
        out["tokens"] = [{"id": i, "piece": logprobs.token_text(tok, i)} for i in ids]
    if body.return_token_strs:
        out["token_strs"] = [logprobs.token_text(tok, i) for i in ids]
    return out


def detokenize(body: DetokenizeRequest, st: State, models: list[str]) -> dict[str, Any]:
    _known(body.model, models)
    vocab = st.tokenizer.vocab_size
    if wrong := [t for t in body.tokens if not 0 <= t < vocab]:
        raise APIError(400, f"token id {wrong[0]} is outside the vocabulary [0, {vocab})")
    text = st.tokenizer.decode(body.tokens)
    return {"prompt": text, "content": text}


def _known(model: str | None, models: list[str]) -> None:
    if model is not None and model not in models:
        raise APIError(404, f"Invalid model: {model}", "invalid_model", "1500")


def add_routes(app: FastAPI, state: State, names: Any) -> None:
    """Register the two routes on `app` (under /v1 and at the root, as vLLM and llama.cpp
    serve them); `names()`: the model names served. The work runs off the event loop."""

    async def off_loop(work: Any, body: Any) -> dict[str, Any]:
        state.ready()
        if state.planners is None:
            state.planners = anyio.CapacityLimiter(planning.PLANNERS)
        result: dict[str, Any] = await anyio.to_thread.run_sync(
            work, body, state, names(), limiter=state.planners)
        return result

    for prefix, listed in (("/v1", True), ("", False)):
        @app.post(f"{prefix}/tokenize", include_in_schema=listed)
        async def tokenize_route(body: TokenizeRequest) -> dict[str, Any]:
            return await off_loop(tokenize, body)

        @app.post(f"{prefix}/detokenize", include_in_schema=listed)
        async def detokenize_route(body: DetokenizeRequest) -> dict[str, Any]:
            return await off_loop(detokenize, body)
