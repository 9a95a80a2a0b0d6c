"""A rank's part of a checkpoint, read straight into its shard: no rank ever holds the whole
model, so a model too big for one machine's memory loads across several."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

from mixtral.config import ModelArgs
from mixtral.model import Transformer
from mixtral.parallel.sharding import Plan, _cut, shard_modules


def read_shard(path: str | os.PathLike, plan: Plan, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu") -> tuple[ModelArgs, dict[str, Tensor]]:
    """This rank's tensors of a checkpoint, one file tensor in flight at a time. Expert banks
    under expert parallelism read only this rank's experts where the layout keeps one tensor
    per expert (HF, Mistral); other tensors are read whole and cut, so a rank holds its shard
    plus at most one file tensor, never the whole model."""
    from mixtral.checkpoint import CheckpointError, inspect, reader
    from mixtral.formats import canonical_shapes, read_one

    info = inspect(path)
    if info.quantization:
        raise CheckpointError(f"{info.path}: is quantized; --tp/--ep load float checkpoints")
    args = info.args
    plan.check(args)
    target = dtype or info.dtype
    read = reader(info)

    def make(shape: tuple[int, ...]) -> Tensor:
        return torch.empty(shape, dtype=target)

    state = {}
    for name, shape in canonical_shapes(args).items():
        suffix = name.split(".", 2)[2] if name.startswith("layers.") else name
        keep, dim, cut = plan.slices(args, suffix)
        t = read_one(info.layout, args, read, make, name, shape, keep)
        t = _cut(t, dim, cut)
        state[name] = (t.clone() if cut is not None else t).to(device)
    return args, state


def load_sharded(path: str | os.PathLike, plan: Plan, dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu",
                 group: dist.ProcessGroup | None = None) -> Transformer:
    """Build this rank's part of the model from a checkpoint, reading only its shard."""
    args, state = read_shard(path, plan, dtype, device)
    with torch.device("meta"):
        model = Transformer(args)
    return shard_modules(model, plan, group, state).eval()
