"""Long prompts through the model a chunk at a time, for the evaluations.

A 32k-token prompt in one call would materialise a [32k, 32k] attention mask per layer and
[32k, 32000] fp32 logits (4 GiB); prefilling a KV cache chunk by chunk bounds both by the chunk
size, and gives exactly the same logits (causal attention over the cached keys). The loop itself
is mixtral.prefill's, shared with the engine and the benchmark."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from mixtral.cache import KVCache
from mixtral.model import Transformer
from mixtral.prefill import chunks, prefill


def check_length(model: Transformer, tokens: int, what: str) -> None:
    """A clear error, not an index error deep in RoPE, when `tokens` positions do not fit."""
    if tokens > model.args.max_seq_len:
        raise ValueError(f"{what} needs {tokens} positions but the model's context is "
                         f"{model.args.max_seq_len} tokens")


def _cache(model: Transformer, positions: int) -> KVCache:
    return KVCache(model.args, 1, positions, model.dtype, model.device)


@torch.inference_mode()
def chunked_logits(model: Transformer, ids: list[int], chunk: int = 1024) -> Iterator[Tensor]:
    """Yield fp32 logits [t, V] for consecutive chunks of `ids` (t <= chunk), in order."""
    check_length(model, len(ids), f"a sequence of {len(ids)} tokens")
    for logits in chunks(model, ids, _cache(model, len(ids)), chunk):
        yield logits[0]


@torch.inference_mode()
def token_nll(model: Transformer, ids: list[int], chunk: int = 1024) -> Tensor:
    """fp32 [len(ids) - 1]: -log p(ids[t + 1] | ids[:t + 1]) for every t, from one pass."""
    targets = torch.tensor(ids[1:])
    out = []
    for i, logits in enumerate(chunked_logits(model, ids, chunk)):
        start = i * chunk
        want = targets[start:start + logits.shape[0]].to(logits.device)
        logits = logits[:len(want)]  # the last position predicts nothing
        out.append(torch.nn.functional.cross_entropy(logits, want, reduction="none").cpu())
    return torch.cat(out)


@torch.inference_mode()
def greedy(model: Transformer, ids: list[int], max_new: int, stop_ids: tuple[int, ...] = (2,),
           chunk: int = 1024) -> list[int]:
    """Greedy continuation of at most `max_new` tokens (a stop id ends it and is dropped)."""
    check_length(model, len(ids) + max_new,
                 f"a prompt of {len(ids)} tokens with {max_new} answer tokens")
    cache = _cache(model, len(ids) + max_new)
    device = model.device
    logits = prefill(model, ids, cache, chunk)[0]
    out: list[int] = []
    while len(out) < max_new:
        token = int(logits.argmax())
        if token in stop_ids:
            break
        out.append(token)
        position = torch.tensor([[len(ids) + len(out) - 1]], device=device)
        logits = model(torch.tensor([[token]], device=device), position, cache,
                       last_only=True)[0, -1]
    return out
