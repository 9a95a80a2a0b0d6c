"""Logits -> token ids, and the log-probabilities of what was sampled. Small pure functions;
randomness only through an explicit generator.

The order follows vLLM's sampler, so its users' settings mean the same here: logit bias and
penalties adjust the logits (see `generate.Sampler`), then temperature, then `min_p` (drop
tokens less likely than min_p times the likeliest), `top_k` (keep the k likeliest), and last
`top_p` over what is left, renormalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# What torch.Generator.manual_seed holds: an unsigned 64-bit integer. (It also takes negative
# numbers down to -2**63, wrapping them onto the same range, so -1 would alias 2**64 - 1; the
# API refuses negative seeds, as Mistral's does.)
SEED_LIMIT = 2**64
LOGPROB_FLOOR = -9999.0  # what OpenAI and vLLM report for a token that cannot be drawn


def sample(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None, top_k: int = 0,
           min_p: float = 0.0) -> Tensor:
    """logits [B, V] -> ids [B]. temperature 0 is greedy (argmax, no randomness)."""
    check(temperature, top_p, top_k, min_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, temperature, top_p, top_k, min_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check(temperature: float, top_p: float, top_k: int = 0, min_p: float = 0.0) -> None:
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if top_k < -1 or not 0 <= min_p <= 1:
        raise ValueError(f"need top_k >= -1 (0 or -1: off) and 0 <= min_p <= 1, got {top_k}, "
                         f"{min_p}")


def probabilities(logits: Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0,
                  min_p: float = 0.0) -> Tensor:
    """The fp32 probabilities [B, V] that `sample` draws from at temperature > 0: zero where a
    filter dropped the token; unnormalised after top_p (multinomial does not mind)."""
    # Shift so the best logit is 0, divide in fp64: a tiny temperature (even 5e-324, which is
    # 0 in fp32) then gives 0 and -inf, never inf - inf = nan.
    logits = logits.double()
    scaled = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    probs = torch.softmax(scaled, dim=-1).float()
    if min_p > 0 or top_k > 0:
        if min_p > 0:  # the likeliest token has probability max, so it always stays
            probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0)
        if top_k > 0:
            probs = top_k_filter(probs, top_k)
        probs = probs / probs.sum(dim=-1, keepdim=True)  # top_p measures what is left
    if top_p < 1:
        probs = top_p_filter(probs, top_p)
    return probs


def top_k_filter(probs: Tensor, top_k: int) -> Tensor:
    """Keep the `top_k` most likely tokens (and any tied with the k-th); zero the rest."""
    if top_k >= probs.shape[-1]:
        return probs
    kth = probs.topk(top_k, dim=-1).values[..., -1:]
    return probs.masked_fill(probs < kth, 0)


def top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one);
    zero the rest. Returns unnormalised probabilities [B, V]."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly likelier tokens
    drop = mass_before >= top_p
    drop[..., 0] = False  # the likeliest token stays even when top_p is 0 in fp32 (< 1e-45)
    sorted_probs[drop] = 0.0
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def log_probabilities(logits: Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0,
                      min_p: float = 0.0) -> Tensor:
    """fp64 log-probabilities [B, V] of the distribution `sample` draws from: -inf where a
    filter (or a -inf logit) leaves no chance, the rest renormalised. Greedy (temperature 0)
    draws the argmax of the temperature-1 distribution, which is what it reports."""
    temperature = temperature or 1.0
    kept = probabilities(logits, temperature, top_p, top_k, min_p) > 0
    logits = logits.double()
    scaled = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    scaled = scaled.masked_fill(~kept, float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token's log-probability and the `top` likeliest alternatives (id, logprob),
    most likely first; floored at LOGPROB_FLOOR, as JSON has no -inf."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprob(logprobs: Tensor, token: int, top: int) -> TokenLogprob:
    """logprobs [V] (from `log_probabilities`) -> the entry of `token` with `top` alternatives."""
    values, ids = logprobs.topk(min(top, logprobs.shape[-1]))
    floor = logprobs.clamp(min=LOGPROB_FLOOR)
    return TokenLogprob(token, float(floor[token]),
                        tuple((int(i), max(float(v), LOGPROB_FLOOR))
                              for v, i in zip(values, ids, strict=True)))


def check_seed(seed: int | None) -> None:
    """ValueError unless `seed` is None or fits a generator: 0 <= seed < 2**64."""
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**64 - 1], got {seed}")


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with `seed`, or from OS entropy when seed is None."""
    check_seed(seed)
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
