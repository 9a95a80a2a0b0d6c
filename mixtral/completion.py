"""Text on top of the token-level loop: streaming deltas, stop strings, finish reasons, usage.

`TextStream` is the one place where generated ids become text. Its deltas are whole UTF-8
characters that join to exactly the final text, and a stop string is matched on the decoded text
and never appears in the output: text that might be the start of one is held back until it is
known not to be.

`TextJob` is the one place where a generation's ids become an answer: the stop id and stop
strings end it ("stop"), running out of ids ends it ("length"), and it counts the usage. Two
drivers feed it: `stream` pulls ids from `generate` (the CLI, scripts), and the engine's token
callbacks push them (`TextJob.on_token`/`on_done`: the server, the lm-eval adapter).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from mixtral.generate import GenerationParams, TokenConstraint, generate
from mixtral.jobs import Job
from mixtral.model import Transformer
from mixtral.sampling import TokenLogprob
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
    # with logprobs: those of the ids since the last delta (the stop id's left out)
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class TextJob:
    """One answer, from the ids of its generation to text deltas, finish reason and usage.

    Every id counts as a completion token, the stop id included (it was generated). The last
    delta has `finish_reason` set; after it the job takes no more ids. Driven by the engine,
    set `job` before the job is queued: a stop string then cancels it, so that its slot is
    free at once rather than after `max_tokens`."""

    def __init__(self, tokenizer: Tokenizer, prompt_tokens: int, stop_ids: tuple[int, ...],
                 stop: tuple[str, ...] = (), context: list[int] | None = None,
                 emit: Callable[[Delta], object] | None = None,
                 fail: Callable[[BaseException], object] | None = None) -> None:
        self.text = TextStream(tokenizer, stop, context)
        self.prompt_tokens, self.stop_ids = prompt_tokens, stop_ids
        self.emit, self.fail = emit, fail  # the engine driver's sinks (its worker thread)
        self.job: Job | None = None
        self.tokens = 0
        self.finish_reason: str | None = None  # set when the answer is complete
        self.first_token_at: float | None = None  # time.monotonic(), for latency metrics
        self.ended_at: float | None = None
        self.logprobs: list[TokenLogprob] = []  # not yet handed out with a delta

    def push(self, token: int) -> Delta | None:
        """One more generated id: the delta it completes (the last one when it ends the
        answer), or None while there is nothing new to show."""
        if self.finish_reason is not None:
            return None
        self.tokens += 1
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if token in self.stop_ids:
            return self._end("stop")
        text = self.text.push(token)
        if self.text.stopped:
            return self._end("stop", text)
        return self._with_logprobs(Delta(text)) if text else None

    def end(self) -> Delta | None:
        """The ids ran out (max_tokens, the context, or a cancelled job): the last delta, with
        whatever text was held back; None if the answer had already ended."""
        if self.finish_reason is not None:
            return None
        return self._end("length")

    def _end(self, reason: str, text: str = "") -> Delta:
        self.finish_reason, self.ended_at = reason, time.monotonic()
        return self._with_logprobs(Delta(text + self.text.finish(), reason, self.prompt_tokens,
                                         self.tokens))

    def _with_logprobs(self, delta: Delta) -> Delta:
        delta.logprobs, self.logprobs = self.logprobs, []
        return delta

    # --- the engine's callbacks (its worker thread) ----------------------------------------

    def on_logprob(self, entry: TokenLogprob) -> None:
        """The logprobs of the id that `on_token` gets next: kept for the delta it shows in."""
        if self.finish_reason is None and entry.token not in self.stop_ids:
            self.logprobs.append(entry)

    def on_token(self, token: int) -> None:
        delta = self.push(token)
        if delta is not None and self.emit is not None:
            self.emit(delta)
        if self.finish_reason is not None and self.job is not None:
            self.job.cancel()  # a no-op after the stop id; after a stop string frees the slot

    def on_done(self, error: BaseException | None) -> None:
        if error is not None:  # no answer: the driver reports the fault (no ids come after it)
            if self.finish_reason is None and self.fail is not None:
                self.fail(error)
            return
        delta = self.end()
        if delta is not None and self.emit is not None:
            self.emit(delta)


def stream(model: Transformer, tokenizer: Tokenizer, prompt: list[int],
           params: GenerationParams, stop: tuple[str, ...] = (),
           constraint: TokenConstraint | None = None) -> Iterator[Delta]:
    """Yield text deltas; the last one carries finish_reason and the token counts."""
    answer = TextJob(tokenizer, len(prompt), params.stop_ids, stop)
    tokens = generate(model, prompt, params, constraint)
    try:
        for token in tokens:
            delta = answer.push(token)
            if delta is not None:
                yield delta
            if answer.finish_reason is not None:
                return
    finally:
        tokens.close()  # frees the cache at once when we stop early
    last = answer.end()
    assert last is not None
    yield last


def complete(model: Transformer, tokenizer: Tokenizer, prompt: list[int],
             params: GenerationParams, stop: tuple[str, ...] = (),
             constraint: TokenConstraint | None = None) -> Completion:
    parts = list(stream(model, tokenizer, prompt, params, stop, constraint))
    last = parts[-1]
    return Completion("".join(p.text for p in parts), last.finish_reason or "length",
                      last.prompt_tokens, last.completion_tokens)
