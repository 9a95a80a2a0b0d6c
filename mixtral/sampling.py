"""Logits -> token ids. Small pure functions; randomness only through an explicit generator."""

from __future__ import annotations

import torch
from torch import Tensor

# What torch.Generator.manual_seed holds: an unsigned 64-bit integer. (It also takes negative
# numbers down to -2**63, wrapping them onto the same range, so -1 would alias 2**64 - 1; the
# API refuses negative seeds, as Mistral's does.)
SEED_LIMIT = 2**64


def sample(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> Tensor:
    """logits [B, V] -> ids [B]. temperature 0 is greedy (argmax, no randomness)."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Shift so the best logit is 0, divide in fp64: a tiny temperature (even 5e-324, which is
    # 0 in fp32) then gives 0 and -inf, never inf - inf = nan.
    logits = logits.double()
    scaled = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    probs = torch.softmax(scaled, dim=-1).float()
    if top_p < 1:
        probs = top_p_filter(probs, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one);
    zero the rest. Returns unnormalised probabilities [B, V]."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly likelier tokens
    drop = mass_before >= top_p
    drop[..., 0] = False  # the likeliest token stays even when top_p is 0 in fp32 (< 1e-45)
    sorted_probs[drop] = 0.0
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


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
