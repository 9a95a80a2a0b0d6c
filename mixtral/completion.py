"""Text on top of the token-level loop: streaming deltas, stop strings, finish reasons, usage.

`TextStream` is the one place where generated ids become text. Its deltas are whole UTF-8
characters that join to exactly the final text, and a stop string is matched on the decoded text
and never appears in the output: text that might be the start of one is held back until it is
known not to be. The CLI drives it from `generate`, the server from the engine's thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from mixtral.generate import GenerationParams, TokenConstraint, generate
from mixtral.model import Transformer
from mixtral.tokenizer import StreamDecoder, Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = (),
                 context: list[int] | None = None) -> None:
        self.decoder = StreamDecoder(tokenizer, context)
        self.stop = tuple(s for s in stop if s)
        self.pending = ""  # decoded, not yet emitted
        self.stopped = False  # a stop string was found: the text is complete

    def push(self, token: int) -> str:
        """Feed one generated (non-EOS) token; return the text that is now safe to emit."""
        if self.stopped:
            return ""
        self.pending += self.decoder.push(token)
        return self._emit(final=False)

    def finish(self) -> str:
        """The end of generation: return whatever text is still held back."""
        if self.stopped:
            return ""
        self.pending += self.decoder.flush()  # a character left incomplete, as U+FFFD
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        keep = 0 if final else _held(self.pending, self.stop)
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out


def _held(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


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
           params: GenerationParams, stop: tuple[str, ...] = (),
           constraint: TokenConstraint | None = None) -> Iterator[Delta]:
    """Yield text deltas; the last one carries finish_reason and the token counts."""
    text = TextStream(tokenizer, stop)
    n, finish = 0, "length"
    tokens = generate(model, prompt, params, constraint)
    try:
        for token in tokens:
            n += 1
            if token in params.stop_ids:
                finish = "stop"
                break
            delta = text.push(token)
            if text.stopped:
                yield Delta(delta, "stop", len(prompt), n)
                return
            if delta:
                yield Delta(delta)
    finally:
        tokens.close()  # frees the cache at once when we stop early
    yield Delta(text.finish(), finish, len(prompt), n)


def complete(model: Transformer, tokenizer: Tokenizer, prompt: list[int],
             params: GenerationParams, stop: tuple[str, ...] = (),
             constraint: TokenConstraint | None = None) -> Completion:
    parts = list(stream(model, tokenizer, prompt, params, stop, constraint))
    last = parts[-1]
    return Completion("".join(p.text for p in parts), last.finish_reason or "length",
                      last.prompt_tokens, last.completion_tokens)
