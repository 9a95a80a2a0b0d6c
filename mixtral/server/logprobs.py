"""Sampled tokens' logprobs (`sampling.TokenLogprob`) in the two shapes OpenAI's API uses.

Chat completions: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`, one
entry per token of the content. Completions (the legacy shape): `{"tokens", "token_logprobs",
"top_logprobs": [{token: logprob}], "text_offset"}`. A token's text is its SentencePiece piece
with "▁" as a space; a byte-fallback piece (`<0xE2>`) is that one byte, whose text is U+FFFD
when the byte is not a whole character (`bytes` is then the exact value), as vLLM does.

An echoed prompt (`echo` with `logprobs`) comes first in the legacy shape, as OpenAI's did:
every prompt token (BOS as `<s>`), null for the first one's logprob and alternatives (nothing
predicts it), the model's own logprobs for the rest (prefill.PromptLogprobs), and offsets
where each token's text starts in the echoed prompt.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import sentencepiece

from mixtral.sampling import TokenLogprob
from mixtral.tokenizer import StreamDecoder, Tokenizer

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


def echoed(tokenizer: Tokenizer, prompt: list[int], entries: list[TokenLogprob],
           text: str) -> dict[str, Any]:
    """The legacy logprobs of an echoed prompt: `prompt`'s ids, `entries` those of positions
    1.. (from the engine), `text` the echoed prompt. A token's offset is how much of the text
    the ids before it decode to (SentencePiece drops the first piece's space, BOS is no text,
    and the bytes of one character share its offset), capped at the text's end."""
    if [e.token for e in entries] != prompt[1:]:
        raise ValueError("the prompt logprobs do not match the prompt's ids")
    decoder, offsets = StreamDecoder(tokenizer), []
    for token in prompt:
        offsets.append(min(len(decoder.text), len(text)))
        decoder.push(token)
    return {"tokens": [token_text(tokenizer, t) for t in prompt],
            "token_logprobs": [None, *(e.logprob for e in entries)],
            "top_logprobs": [None, *(_by_text(tokenizer, e.top) for e in entries)],
            "text_offset": offsets}


def concat(*parts: dict[str, Any]) -> dict[str, Any]:
    """Legacy logprobs of consecutive stretches of one text (the prompt, then the answer)."""
    return {key: [x for part in parts for x in part[key]]
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def _by_text(tokenizer: Tokenizer, top: tuple[tuple[int, float], ...]) -> dict[str, float]:
    """{text: logprob}, most likely first; ids that share a text keep the likelier's value."""
    out: dict[str, float] = {}
    for token, value in top:
        out.setdefault(token_text(tokenizer, token), value)
    return out
