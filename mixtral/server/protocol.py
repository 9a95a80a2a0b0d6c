"""The Mistral chat API on the wire: request schema, response and stream shapes, error bodies.

Shapes follow what every version of the official clients parses (mistralai 0.4.2 to 3.x, openai;
see shared/reference/mistral-api-contract.md): `content` is always a string, `finish_reason` is
"stop" or "length", usage has all three counts, model cards carry `capabilities` and `type`.
Unknown request fields are refused (422) as the real API does, but the OpenAI fields that
clients send are accepted and mapped: `seed` -> `random_seed`, `max_completion_tokens` ->
`max_tokens`, `stream_options.include_usage`, the `developer` role -> `system`; `user`, `store`,
`metadata` are ignored. vLLM's sampling extensions (`top_k`, `min_p`, `repetition_penalty`)
and OpenAI's `logit_bias` and `logprobs` are served (see `Sampling`).
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ALIASES = ("open-mixtral-8x7b", "mistral-small", "mistral-small-2312")
CREATED = 1702252800  # 2023-12-11, Mixtral 8x7B's release
SEED_MAX = 2**64 - 1  # what a torch.Generator holds; choice i of n samples with seed + i
ERROR_TEXT_LIMIT = 1000  # characters of an error message: never echo megabytes of input


class TextChunk(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # per-message extras of newer clients are harmless
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextChunk] | None = None
    prefix: bool = False
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None  # OpenAI clients may name a participant; ignored

    @field_validator("role")
    @classmethod
    def _developer(cls, v: str) -> str:
        return "system" if v == "developer" else v  # newer OpenAI SDKs' name for it

    def as_chat(self) -> dict[str, Any]:
        content: Any = self.content
        if isinstance(content, list):
            content = [c.model_dump() for c in content]
        out: dict[str, Any] = {"role": self.role, "content": content}
        if self.role == "assistant":
            out["prefix"] = self.prefix
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


TEMPERATURE_MAX = 2.0  # OpenAI's range; Mistral's own API stops at MISTRAL_TEMPERATURE_MAX
MISTRAL_TEMPERATURE_MAX = 1.5
MISTRAL_ONLY = ("random_seed", "safe_prompt", "safe_mode")  # fields only Mistral's shape has


class Sampling(BaseModel):
    """The fields both generation routes share: OpenAI's, and vLLM's extensions with vLLM's
    meaning (top_k -1 or 0: off; repetition_penalty 1: off, applied to the prompt's tokens and
    the answer's; logit_bias: token id -> -100..100 added to its logit)."""
    model_config = ConfigDict(extra="forbid")
    model: str
    temperature: float | None = Field(None, ge=0.0, le=TEMPERATURE_MAX)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0)  # bounds keep logits finite
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = Field(None, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    n: int | None = Field(None, ge=1, le=8)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop strings")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"logit_bias keys are token ids (digits), got {clip(key, 40)!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values are in [-100, 100], got {bias} for {key}")
        return v

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def sampling_seed(self) -> int | None:
        return self.seed


class ChatCompletionRequest(Sampling):
    messages: list[Message]
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)  # OpenAI's name
    random_seed: int | None = Field(None, ge=0, le=SEED_MAX)  # `seed` is OpenAI's name
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    safe_prompt: bool = False
    safe_mode: bool = False  # the Dec-2023 name of safe_prompt
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None

    @model_validator(mode="after")
    def _logprobs_asked(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @model_validator(mode="after")
    def _seeds_fit(self) -> ChatCompletionRequest:
        seed, n = self.sampling_seed, self.n or 1
        if seed is not None and seed + n - 1 > SEED_MAX:
            field = "random_seed" if self.random_seed is not None else "seed"
            raise ValueError(f"{field} + n - 1 must be at most 2**64 - 1 (choice i samples "
                             f"with {field} + i); got {field} {seed} with n {n}")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    @property
    def sampling_seed(self) -> int | None:
        return self.random_seed if self.random_seed is not None else self.seed

    @property
    def top_logprobs_count(self) -> int | None:
        """How many alternatives each token's logprobs list; None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def mistral_shaped(self, user_agent: str) -> bool:
        """Sent in Mistral's own shape: by its client, or with a field only Mistral's API has."""
        return user_agent.startswith("mistral-client") or \
            any(f in self.model_fields_set for f in MISTRAL_ONLY)


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string (or key) in `value` that holds a lone UTF-16
    surrogate ("\\ud800" is valid JSON but no character), or None. Iterative, so that a
    deeply nested value (a JSON schema) cannot exhaust the stack."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if _has_surrogate(item):
                return where or "body"
            continue
        children: list[tuple[Any, Any]] = []
        if isinstance(item, dict):
            children = list(item.items())
        elif isinstance(item, (list, tuple)):
            children = list(enumerate(item))
        for key, child in reversed(children):  # popped in order: the first one is reported
            shown = str(key).encode("utf-8", "backslashreplace").decode()  # the path is echoed
            inner = f"{where}.{shown}" if where else shown
            stack.append((child, inner))
            if isinstance(key, str) and _has_surrogate(key):
                stack.append((key, inner))
    return None


def _has_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:  # strict UTF-8 refuses exactly the surrogates, at C speed (a prompt can be megabytes)
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def clip(text: str, limit: int = ERROR_TEXT_LIMIT) -> str:
    """`text`, cut to `limit` characters with a note of how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def new_id() -> str:
    return secrets.token_hex(16)  # 32 hex characters, like the real API's ids


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def completion_response(id_: str, created: int, model: str,
                        choices: list[tuple[str, str, dict[str, Any] | None]],
                        prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """choices: (content, finish_reason, logprobs or None) per choice. `logprobs` is there
    when asked for: without it the shape is Mistral's, key for key."""
    return {
        "id": id_, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": content,
                                             "tool_calls": None, "prefix": False},
                     "finish_reason": finish, **_logprobs(logprobs)}
                    for i, (content, finish, logprobs) in enumerate(choices)],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(id_: str, created: int, model: str, delta: dict[str, Any], index: int = 0,
          finish_reason: str | None = None, usage_: dict[str, int] | None = None,
          logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason,
                         **_logprobs(logprobs)}],
            "usage": usage_}


def _logprobs(logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {} if logprobs is None else {"logprobs": logprobs}


def model_card(id_: str, aliases: list[str], context: int, description: str) -> dict[str, Any]:
    return {
        "id": id_, "object": "model", "created": CREATED, "owned_by": "mistralai",
        "capabilities": {"completion_chat": True, "function_calling": False,
                         "completion_fim": False, "fine_tuning": False, "vision": False},
        "name": id_, "description": description, "max_context_length": context,
        "aliases": aliases, "deprecation": None, "default_model_temperature": 0.7,
        "type": "base",
    }


def error_body(message: str | dict[str, Any], type_: str, code: str | None = None,
               detail: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Mistral's flat error shape, plus OpenAI's nested `error` (harmless to both clients)."""
    text = message if isinstance(message, str) else str(message)
    body: dict[str, Any] = {"object": "error", "message": message, "type": type_, "param": None,
                            "code": code,
                            "error": {"message": text, "type": type_, "param": None, "code": code}}
    if detail is not None:
        body["detail"] = detail  # mistralai >= 1 parses it into HTTPValidationError.data
    return body


def unauthorized_body() -> dict[str, Any]:
    return {"message": "Unauthorized", "request_id": new_id(),
            "error": {"message": "Unauthorized", "type": "authentication_error", "param": None,
                      "code": None}}


def now() -> int:
    return int(time.time())
