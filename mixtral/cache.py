"""The KV cache, owned by the caller (generation loop, engine) and passed into the model.

Preallocated once: [layers, B, K, max_seq_len, A] for keys and for values. Slot s of a row holds
the key/value of position s, so a row can be prefilled in chunks and decoded one token at a time
and rows of different lengths can share a batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixtral.config import ModelArgs


class KVCache:
    def __init__(self, args: ModelArgs, batch_size: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (args.n_layers, batch_size, args.n_kv_heads, max_seq_len, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slot_ids = list(range(batch_size))  # which of the cache's rows a batch row is

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[3]

    def span(self, positions: Tensor) -> int:
        """How many slots this call attends over: up to the furthest position written."""
        end = int(positions.max()) + 1
        if end > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_seq_len} positions; "
                             f"position {end - 1} does not fit")
        return end

    def layer(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """This layer's key and value stores [R, K, S, A] and the store row of each batch row,
        for kernels that write and read the cache in place."""
        rows = self.__dict__.get("_row_ids")
        if rows is None:
            rows = self._row_ids = torch.arange(self.k.shape[1], device=self.k.device)
        return self.k[layer], self.v[layer], rows

    def rows(self, slots: list[int]) -> KVCache | CacheRows:
        """The cache as seen by a batch whose row i is sequence `slots[i]`."""
        if slots == list(range(slots[0], slots[0] + len(slots))):  # a contiguous run: a view
            view = object.__new__(KVCache)
            view.k = self.k[:, slots[0]:slots[0] + len(slots)]
            view.v = self.v[:, slots[0]:slots[0] + len(slots)]
            view.slot_ids = [self.slot_ids[s] for s in slots]
            return view
        return CacheRows(self, torch.tensor(slots, device=self.k.device),
                         [self.slot_ids[s] for s in slots])

    def update(self, layer: int, positions: Tensor, k: Tensor, v: Tensor,
               span: int) -> tuple[Tensor, Tensor]:
        """Write k, v [B, K, T, A] at positions [B, T]; return this layer's [B, K, span, A]."""
        if k.shape[0] == 1:  # one row (decoding alone): a copy along positions, cheaper
            self.k[layer, 0].index_copy_(1, positions[0], k[0].to(self.k.dtype))
            self.v[layer, 0].index_copy_(1, positions[0], v[0].to(self.v.dtype))
            return self.k[layer, :, :, :span], self.v[layer, :, :, :span]
        idx = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # [B, K, T, A]
        self.k[layer].scatter_(2, idx, k.to(self.k.dtype))
        self.v[layer].scatter_(2, idx, v.to(self.v.dtype))
        return self.k[layer, :, :, :span], self.v[layer, :, :, :span]


class CacheRows:
    """Scattered slots of a KVCache as one batch: writes go to the slots, reads gather them."""

    def __init__(self, cache: KVCache, slots: Tensor, slot_ids: list[int]) -> None:
        self.cache, self.slots, self.slot_ids = cache, slots, slot_ids

    def span(self, positions: Tensor) -> int:
        return self.cache.span(positions)

    def layer(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.cache.k[layer], self.cache.v[layer], self.slots

    def update(self, layer: int, positions: Tensor, k: Tensor, v: Tensor,
               span: int) -> tuple[Tensor, Tensor]:
        B, _, T, _ = k.shape
        rows = self.slots[:, None].expand(B, T)
        for store, new in ((self.cache.k[layer], k), (self.cache.v[layer], v)):
            # [slots, K, S, A] seen as [slots, S, K, A]: index (slot, position) pairs
            store.transpose(1, 2).index_put_((rows, positions), new.transpose(1, 2).to(store.dtype))
        return (self.cache.k[layer, self.slots, :, :span],
                self.cache.v[layer, self.slots, :, :span])
