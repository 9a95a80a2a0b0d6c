"""The reference decode loop: prefill a prompt, then decode one token at a time with a KV cache.

Token ids in, token ids out. Text, chat templates and stop strings live above (`completion.py`);
a grammar (JSON mode) reaches this loop only as a `TokenConstraint` that masks the logits.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from mixtral.cache import KVCache
from mixtral.model import Runner, Transformer
from mixtral.prefill import prefill
from mixtral.sampling import (
    TokenLogprob,
    check,
    log_probabilities,
    make_generator,
    sample,
    token_logprob,
)


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int | None = None  # None: up to the end of the context
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # same seed, prompt and params -> same tokens
    min_tokens: int = 0  # stop ids are masked until this many tokens exist
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # ... times how often it was generated
    stop_ids: tuple[int, ...] = (2,)
    # vLLM's extensions: see sampling.py for the order they apply in
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages every token of the prompt and the answer
    logit_bias: tuple[tuple[int, float], ...] = ()  # (id, added to its logit) pairs
    logprobs: int | None = None  # report each token's logprob and this many alternatives


class TokenConstraint(Protocol):
    """Which tokens may come next (e.g. a JSON grammar); the loop reports each chosen token."""

    def allowed(self, remaining: int | None = None) -> Tensor:
        """bool [vocab]: True where the token may be sampled next; `remaining` is how many
        tokens the budget still allows, this one included (to finish in time)."""
        ...

    def advance(self, token: int) -> None: ...


def max_new_tokens(model: Runner, prompt: list[int], params: GenerationParams,
                   context: int | None = None) -> int:
    """The number of tokens the request may generate within `context` positions (default: the
    model's); ValueError if it cannot run."""
    args = model.args
    limit = context or args.max_seq_len
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    bad = [t for t in prompt if not 0 <= t < args.vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {args.vocab_size})")
    room = limit - len(prompt)
    if params.max_tokens is None:
        if room < 1:
            raise ValueError(f"the prompt of {len(prompt)} tokens fills the model's context of "
                             f"{limit} tokens")
        return room
    if params.max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {params.max_tokens}")
    if params.max_tokens > room:
        raise ValueError(f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} = "
                         f"{len(prompt) + params.max_tokens} exceeds the model's context of "
                         f"{limit} tokens")
    return params.max_tokens


class Sampler:
    """How one sequence picks its next tokens: logit bias, penalties, min_tokens, the
    constraint, the seeded sampling of `params` and its logprobs. The decode loop and the
    batching engine both use it, one instance per sequence, so a request samples the same
    tokens alone or in a batch."""

    def __init__(self, params: GenerationParams, max_new: int, vocab_size: int,
                 device: torch.device | str = "cpu",
                 constraint: TokenConstraint | None = None, prompt: Sequence[int] = ()) -> None:
        """`prompt`: the ids before the answer, which a repetition penalty also discourages."""
        check(params.temperature, params.top_p, params.top_k, params.min_p)
        if not params.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {params.repetition_penalty}")
        self.params, self.max_new, self.constraint = params, max_new, constraint
        self.generator = make_generator(params.seed, device)
        self.stop_ids = torch.tensor(params.stop_ids, device=device, dtype=torch.long)
        self.penalised = params.presence_penalty != 0 or params.frequency_penalty != 0
        self.counts = torch.zeros(vocab_size, device=device) if self.penalised else None
        self.seen = None  # tokens of the prompt and the answer, for the repetition penalty
        if params.repetition_penalty != 1:
            self.seen = torch.zeros(vocab_size, device=device, dtype=torch.bool)
            self.seen[torch.tensor(list(prompt), device=device, dtype=torch.long)] = True
        self.bias = None
        if params.logit_bias:
            ids, values = zip(*params.logit_bias, strict=True)
            self.bias = torch.zeros(vocab_size, device=device).index_put_(
                (torch.tensor(ids, device=device),), torch.tensor(values, device=device))
        self.generated = 0
        self.logprob: TokenLogprob | None = None  # the last token's, with params.logprobs

    def __call__(self, logits: Tensor) -> int:
        """logits [1, V] for the next position -> the chosen token id."""
        p, i = self.params, self.generated
        if self.bias is not None:
            logits = logits + self.bias
        if self.seen is not None:  # vLLM's (and CTRL's): shrink a seen token's logit
            penalty = p.repetition_penalty
            shrunk = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(self.seen, shrunk, logits)
        if self.counts is not None:
            logits = logits - p.presence_penalty * (self.counts > 0) \
                - p.frequency_penalty * self.counts
        allowed = None
        if self.constraint is not None:
            allowed = self.constraint.allowed(self.max_new - i).to(logits.device)
        if i < p.min_tokens:
            if allowed is None:
                logits = logits.index_fill(-1, self.stop_ids, float("-inf"))
            elif allowed.index_fill(0, self.stop_ids, False).any():  # unless only a stop fits
                allowed = allowed.index_fill(0, self.stop_ids, False)
        if allowed is not None:
            if not allowed.any():
                raise RuntimeError("the output constraint allows no token at all")
            logits = logits.masked_fill(~allowed, float("-inf"))
        token = int(sample(logits, p.temperature, p.top_p, self.generator, p.top_k, p.min_p))
        if p.logprobs is not None:
            self.logprob = token_logprob(
                log_probabilities(logits, p.temperature, p.top_p, p.top_k, p.min_p)[0], token,
                p.logprobs)
        if self.constraint is not None:
            self.constraint.advance(token)
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True
        self.generated += 1
        return token

    def finished(self, token: int) -> bool:
        return token in self.params.stop_ids or self.generated >= self.max_new


@torch.inference_mode()
def _forward(model: Transformer, tokens: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
    return model(tokens, positions, cache, last_only=True)[:, -1]  # [B, V]


def generate(model: Transformer, prompt: list[int], params: GenerationParams,
             constraint: TokenConstraint | None = None) -> Generator[int, None, None]:
    """Yield new token ids; a stop id (EOS) is yielded and ends the stream.

    Close the generator to stop early: the cache is freed with it."""
    n = max_new_tokens(model, prompt, params)
    if n == 0:
        return
    device = model.device
    cache = KVCache(model.args, 1, len(prompt) + n, model.dtype, device)
    choose = Sampler(params, n, model.args.vocab_size, device, constraint, prompt)
    logits = prefill(model, prompt, cache)  # the whole prompt in one call
    while True:
        token = choose(logits)
        yield token
        if choose.finished(token):
            return
        position = len(prompt) + choose.generated - 1
        logits = _forward(model, torch.tensor([[token]], device=device),
                          torch.tensor([[position]], device=device), cache)
