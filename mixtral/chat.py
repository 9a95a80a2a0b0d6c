"""Conversations -> token ids, exactly as Mistral encodes them for Mixtral-8x7B-Instruct.

mistral-common's `InstructTokenizerV1` is the ground truth (it is what Mistral's API uses), so
this module only adapts API-style message dicts to it and turns its exceptions into `ChatError`:

    <s> [INST] {system}\\n\\n{user1} [/INST] {assistant1}</s> [INST] {user2} [/INST]

System messages are joined and prefixed to the first user message; consecutive messages of one
role are merged; an assistant message with `"prefix": true` (last only) is continued, not closed.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from pydantic import ValidationError

from mixtral.tokenizer import Tokenizer, default_tokenizer

# Mistral's guardrail; `safe_prompt=True` inserts it as the first system message.
SAFE_PROMPT = ("Always assist with care, respect, and truth. Respond with utmost utility yet "
               "securely. Avoid harmful, unethical, prejudiced, or negative content. Ensure "
               "replies promote fairness and positivity.")

ROLES = ("system", "user", "assistant")


class ChatError(ValueError):
    """A conversation that cannot become a prompt (wrong roles, order or fields)."""


def encode(messages: list[dict[str, Any]], safe_prompt: bool = False,
           tokenizer: Tokenizer | None = None) -> list[int]:
    """Token ids of the prompt for `messages` ({"role", "content"[, "prefix"]} dicts), ending
    in `[/INST]` (or in the text of a final assistant message with `"prefix": true`)."""
    tokenizer = tokenizer or default_tokenizer()
    checked = [_check(i, m) for i, m in enumerate(messages)]
    if safe_prompt:
        checked.insert(0, {"role": "system", "content": SAFE_PROMPT})
    return _encode(checked, tokenizer.mistral)


def encode_for_training(messages: list[dict[str, Any]],
                        tokenizer: Tokenizer | None = None) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a whole conversation ending with an assistant message: the
    mask is 1 exactly on each assistant message's tokens and its closing `</s>`, the tokens a
    fine-tuned model must learn to produce."""
    tokenizer = tokenizer or default_tokenizer()
    checked = [_check(i, m) for i, m in enumerate(messages)]
    if not checked or checked[-1]["role"] != "assistant":
        raise ChatError("a training conversation must end with an assistant message")
    ids = _encode(checked, _finetuning(str(tokenizer.model_file)))
    mask = [0] * len(ids)
    for i, m in enumerate(checked):
        if m["role"] != "assistant":
            continue
        start = len(_encode(checked[:i], tokenizer.mistral))  # the prompt before this answer
        end = len(_encode(checked[:i + 1], _finetuning(str(tokenizer.model_file))))
        if ids[:start] != _encode(checked[:i], tokenizer.mistral):
            raise ChatError(f"messages[{i}]: the prompt does not prefix the conversation")
        mask[start:end] = [1] * (end - start)
    return ids, mask


@lru_cache(maxsize=2)
def _finetuning(model_file: str) -> MistralTokenizer:
    return MistralTokenizer.from_file(model_file, mode=ValidationMode.finetuning)


def _encode(messages: list[dict[str, Any]], mistral: MistralTokenizer) -> list[int]:
    try:
        request: ChatCompletionRequest = ChatCompletionRequest.model_validate(
            {"messages": messages})
        return mistral.encode_chat_completion(request).tokens
    except ValidationError as e:
        raise ChatError(f"invalid messages: {_first_error(e)}") from None
    except MistralCommonException as e:
        raise ChatError(f"invalid conversation: {e}") from None


def _check(i: int, message: Any) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise ChatError(f"{where} must be an object with 'role' and 'content', got {message!r}")
    role = message.get("role")
    if role == "tool" or message.get("tool_calls"):
        raise ChatError(f"{where}: tools are not supported by Mixtral-8x7B's v1 tokenizer")
    if role not in ROLES:
        raise ChatError(f"{where}: role must be one of {', '.join(ROLES)}, got {role!r}")
    content = message.get("content")
    if content is None:
        content = ""
    if isinstance(content, list):
        for j, chunk in enumerate(content):
            if not (isinstance(chunk, dict) and chunk.get("type") == "text"
                    and isinstance(chunk.get("text"), str)):
                raise ChatError(f"{where}.content[{j}]: only text chunks "
                                f'{{"type": "text", "text": "..."}} are supported, got {chunk!r}')
    elif not isinstance(content, str):
        raise ChatError(f"{where}.content must be a string or a list of text chunks, "
                        f"got {type(content).__name__}")
    out: dict[str, Any] = {"role": role, "content": content}
    if "prefix" in message and message["prefix"] is not None:
        if role != "assistant" or not isinstance(message["prefix"], bool):
            raise ChatError(f"{where}: 'prefix' is a boolean for assistant messages only")
        out["prefix"] = message["prefix"]
    return out


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    return f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
