"""Sampled tokens' logprobs (`sampling.TokenLogprob`) in the two shapes OpenAI's API uses.

Chat completions: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`, one
entry per token of the content. Completions (the legacy shape): `{"tokens", "token_logprobs",
"top_logprobs": [{token: logprob}], "text_offset"}`. A token's text is its SentencePiece piece
with "▁" as a space; a byte-fallback piece (`<0xE2>`) is that one byte, whose text is U+FFFD
when the byte is not a whole character (`bytes` is then the exact value), as vLLM does.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import sentencepiece

from mixtral.sampling import TokenLogprob
from mixtral.tokenizer import Tokenizer

_BYTE = re.compile(r"<0x([0-9A-F]{2})>")


@lru_cache(maxsize=4)
def _pieces(tokenizer: Tokenizer) -> tuple[bytes, ...]:
    """The UTF-8 bytes each id stands for (control ids: their name, e.g. b"</s>")."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer.model_file))
    out = []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        byte = _BYTE.fullmatch(piece) if sp.is_byte(i) else None
        out.append(bytes([int(byte.group(1), 16)]) if byte else
                   piece.replace("\u2581", " ").encode())
    return tuple(out)


def token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    pieces = _pieces(tokenizer)
    return pieces[token] if 0 <= token < len(pieces) else b""


def token_text(tokenizer: Tokenizer, token: int) -> str:
    return token_bytes(tokenizer, token).decode("utf-8", errors="replace")


def chat(tokenizer: Tokenizer, entries: list[TokenLogprob]) -> dict[str, Any]:
    """`choices[i].logprobs` of a chat completion (or of one stream chunk)."""
    def one(token: int, logprob: float) -> dict[str, Any]:
        return {"token": token_text(tokenizer, token), "logprob": logprob,
                "bytes": list(token_bytes(tokenizer, token))}

    return {"content": [{**one(e.token, e.logprob),
                         "top_logprobs": [one(t, v) for t, v in e.top]} for e in entries]}


def legacy(tokenizer: Tokenizer, entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """`choices[i].logprobs` of a completion: `offset` is where the first token's text starts
    in the choice's text (after an echoed prompt)."""
    tokens = [token_text(tokenizer, e.token) for e in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [_by_text(tokenizer, e.top) for e in entries],
            "text_offset": offsets}


def _by_text(tokenizer: Tokenizer, top: tuple[tuple[int, float], ...]) -> dict[str, float]:
    """{text: logprob}, most likely first; ids that share a text keep the likelier's value."""
    out: dict[str, float] = {}
    for token, value in top:
        out.setdefault(token_text(tokenizer, token), value)
    return out
