"""Text completion on top of the token-level loop: streaming deltas, stop strings, usage.

This is where ids become text: deltas are whole UTF-8 characters that join to exactly the final
text, and a stop string is matched on the decoded text and never appears in the output (text
that might be the start of one is held back until it is known not to be).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from mixtral.generate import generate
from mixtral.model import Transformer
from mixtral.tokenizer import StreamDecoder, Tokenizer


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: up to the end of the context
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Delta:
    text: str
    finish_reason: str | None = None  # "stop" or "length" on the last delta
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def stream(model: Transformer, tokenizer: Tokenizer, prompt: list[int],
           params: SamplingParams) -> Iterator[Delta]:
    """Yield text deltas; the last one carries finish_reason and the token counts."""
    max_tokens = params.max_tokens
    if max_tokens is None:
        max_tokens = model.args.max_seq_len - len(prompt)
    stops = tuple(s for s in params.stop if s)
    decoder = StreamDecoder(tokenizer)
    pending = ""  # decoded text not yet emitted
    n = 0  # tokens generated, EOS included
    finish = "length"
    tokens = generate(model, prompt, max_tokens, params.temperature, params.top_p, params.seed,
                      stop_ids=(tokenizer.eos_id,))
    try:
        for token in tokens:
            n += 1
            if token == tokenizer.eos_id:
                finish = "stop"
                break
            pending += decoder.push(token)
            cut = _find_stop(pending, stops)
            if cut is not None:
                yield Delta(pending[:cut], "stop", len(prompt), n)
                return
            emit = len(pending) - _held(pending, stops)
            if emit:
                yield Delta(pending[:emit])
                pending = pending[emit:]
    finally:
        tokens.close()
    pending += decoder.flush()  # a character left incomplete at the end, as U+FFFD
    cut = _find_stop(pending, stops)
    if cut is not None:
        pending, finish = pending[:cut], "stop"
    yield Delta(pending, finish, len(prompt), n)


def complete(model: Transformer, tokenizer: Tokenizer, prompt: list[int],
             params: SamplingParams) -> Completion:
    parts = list(stream(model, tokenizer, prompt, params))
    last = parts[-1]
    return Completion("".join(p.text for p in parts), last.finish_reason or "length",
                      last.prompt_tokens, last.completion_tokens)


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
