"""The reference decode loop: prefill a prompt, then decode one token at a time with a KV cache.

Token ids in, token ids out. Text, chat templates and stop strings live above (`completion.py`).
"""

from __future__ import annotations

from collections.abc import Generator

import torch
from torch import Tensor

from mixtral.cache import KVCache
from mixtral.model import Transformer
from mixtral.sampling import make_generator, sample


def check_request(model: Transformer, prompt: list[int], max_tokens: int) -> None:
    """Raise ValueError for a prompt or length the model cannot take."""
    args = model.args
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    bad = [t for t in prompt if not 0 <= t < args.vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {args.vocab_size})")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    if len(prompt) + max_tokens > args.max_seq_len:
        raise ValueError(f"prompt of {len(prompt)} tokens + max_tokens {max_tokens} = "
                         f"{len(prompt) + max_tokens} exceeds the model's context of "
                         f"{args.max_seq_len} tokens")


@torch.inference_mode()
def _forward(model: Transformer, tokens: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
    return model(tokens, positions, cache, last_only=True)[:, -1]  # [B, V]


def generate(model: Transformer, prompt: list[int], max_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None,
             stop_ids: tuple[int, ...] = (2,)) -> Generator[int, None, None]:
    """Yield up to max_tokens new ids; a stop id (EOS) is yielded and ends the stream.

    Close the iterator to stop early: the cache is freed with it."""
    check_request(model, prompt, max_tokens)
    weight = model.tok_embeddings.weight  # embeddings are never quantized: dtype, device
    device = weight.device
    cache = KVCache(model.args, 1, len(prompt) + max_tokens, weight.dtype, device)
    generator = make_generator(seed, device)
    tokens = torch.tensor([prompt], device=device)
    positions = torch.arange(len(prompt), device=device)[None]
    logits = _forward(model, tokens, positions, cache)
    for i in range(max_tokens):
        token = sample(logits, temperature, top_p, generator)  # [1]
        token_id = int(token)
        yield token_id
        if token_id in stop_ids or i == max_tokens - 1:
            return
        positions = torch.tensor([[len(prompt) + i]], device=device)
        logits = _forward(model, token[:, None], positions, cache)
