"""Prefill: a prompt fed through the model into a KV cache, written once for every caller
(the engine, the reference decode loop, the evaluations, the benchmark).

The ids go in `chunk` tokens per forward call at positions start, start+1, ...; a chunk attends
to the cached positions before it, so the logits are those of one call over the whole prompt,
while a long prompt never builds a [T, T] mask or [T, V] logits bigger than the chunk's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from mixtral.cache import CacheRows, KVCache
from mixtral.model import Runner


@torch.inference_mode()
def chunks(model: Runner, ids: Sequence[int], cache: KVCache | CacheRows,
           chunk: int | None = None, *, start: int = 0, **forward: Any) -> Iterator[Any]:
    """Feed `ids` (one sequence) into `cache` at positions start..start+len(ids)-1, `chunk`
    tokens per call (default: all in one); yield what each call returns, in order. `forward`
    goes to every call (last_only, return_router_logits)."""
    if not ids:
        raise ValueError("nothing to prefill: the prompt has no tokens")
    step = len(ids) if chunk is None else chunk
    if step < 1:
        raise ValueError(f"prefill chunk must be at least 1 token, got {chunk}")
    device = model.device
    for at in range(0, len(ids), step):
        piece = ids[at:at + step]
        tokens = torch.tensor([list(piece)], device=device)  # [1, t]
        positions = torch.arange(start + at, start + at + len(piece), device=device)[None]
        yield model(tokens, positions, cache, **forward)


def prefill(model: Runner, ids: Sequence[int], cache: KVCache | CacheRows,
            chunk: int | None = None, *, start: int = 0) -> Tensor:
    """Feed `ids` into `cache` as `chunks` does -> the fp32 logits [1, V] after the last one."""
    for out in chunks(model, ids, cache, chunk, start=start, last_only=True):
        logits = out  # each chunk's logits replace the last one's: only the final ones are kept
    return logits[:, -1]
