"""Joining a torchrun launch, and serving across one.

The launch's environment (RANK, WORLD_SIZE, LOCAL_RANK, which torchrun sets) is read here and
nowhere else: `rank()`, `world()`, `local_rank()`, `is_leader()`. Rank 0 leads: it alone
prints a command's results and logs below WARNING. The followers run the same command on their
shards without a word, but their warnings and errors still reach stderr, so a follower that
fails says why.

Under `mixtral serve`, rank 0 runs the engine and the other ranks repeat its model calls
(`Leader`, `follow`).
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mixtral.cache import KVCache
from mixtral.model import Transformer
from mixtral.parallel.sharding import ParallelError, Plan


def _env(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ParallelError(f"{name}={text!r} is not a whole number (torchrun sets it; "
                            "unset it outside a launch)") from None


def launched() -> bool:
    """Whether this process is one of a torchrun launch's."""
    return "WORLD_SIZE" in os.environ


def world() -> int:
    """Processes in the launch (1 outside one)."""
    return _env("WORLD_SIZE", 1)


def rank() -> int:
    """This process's rank in the launch (0 outside one)."""
    return _env("RANK", 0)


def local_rank() -> int:
    """This process's rank on its machine: the GPU it takes."""
    return _env("LOCAL_RANK", 0)


def is_leader() -> bool:
    """Rank 0, or a process outside any launch: the one that speaks for the command."""
    return rank() == 0


def init(plan_tp: int, plan_ep: int, device: str = "cpu",
         timeout_s: float | None = None) -> Plan:
    """Join the torchrun launch (gloo on CPU, NCCL on CUDA) and return this rank's plan.
    A peer that dies or never arrives ends every rank with an error after `timeout_s`
    (MIXTRAL_DIST_TIMEOUT, default 120 s) instead of a hang."""
    if not launched():
        raise ParallelError(f"--tp {plan_tp} / --ep {plan_ep} need one process per rank: "
                            f"launch with torchrun --nproc-per-node {max(plan_tp, plan_ep)} "
                            "-m mixtral ...")
    plan = Plan(plan_tp, plan_ep, rank())
    if world() != plan.world:
        raise ParallelError(f"the launch has {world()} processes but --tp {plan_tp} --ep "
                            f"{plan_ep} needs {plan.world}: run torchrun --nproc-per-node "
                            f"{plan.world}")
    seconds = timeout_s or float(os.environ.get("MIXTRAL_DIST_TIMEOUT", "120"))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    return plan


def join(tp: int, ep: int, device: str) -> tuple[Plan, str]:
    """Join the torchrun launch: this rank's plan and device (its GPU, LOCAL_RANK, under
    CUDA). A follower's logging is quieted; its commands print only if `is_leader()`."""
    plan = init(tp, ep, device)
    if device.startswith("cuda"):
        device = f"cuda:{local_rank()}"
        torch.cuda.set_device(device)
    if not is_leader():
        quiet()
    return plan, device


def quiet() -> None:
    """A follower's INFO and DEBUG records would repeat the leader's: drop them everywhere
    (libraries' loggers too, whatever levels they set), keep warnings and errors."""
    logging.disable(logging.INFO)


def finish() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# --- serving: rank 0 runs the engine, the other ranks repeat its model calls ---------------------

_IDLE = datetime.timedelta(days=365)  # a server may wait for requests for as long as it likes


class Leader(nn.Module):
    """Rank 0's model under `mixtral serve`: every call is announced to the followers (rows of
    the KV cache, tokens, positions) before it runs, so they make the same call on their own
    shards and caches and the all-reduces inside meet. Announcements go over their own group,
    with no timeout: an idle server is not an error. A rank that dies ends the launch through
    torchrun; the collectives inside the model keep MIXTRAL_DIST_TIMEOUT."""

    def __init__(self, model: Transformer, max_batch: int) -> None:
        super().__init__()
        self.model, self.max_batch, self.args = model, max_batch, model.args
        self.control = dist.new_group(backend="gloo", timeout=_IDLE)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, tokens: Tensor, positions: Tensor, cache: KVCache,
                last_only: bool = False) -> Tensor:
        B, T = tokens.shape
        slots = cache.slot_ids
        _announce(self.control, [B, T, int(last_only), *slots], self.max_batch)
        for t in (tokens, positions):
            dist.broadcast(t.cpu(), 0, group=self.control)
        return cast(Tensor, self.model(tokens, positions, cache, last_only=last_only))

    def stop(self) -> None:
        _announce(self.control, [0, 0, 0], self.max_batch)


def _announce(group: dist.ProcessGroup, values: list[int], max_batch: int) -> None:
    header = torch.full((3 + max_batch,), -1, dtype=torch.long)
    header[:len(values)] = torch.tensor(values)
    dist.broadcast(header, 0, group=group)


@torch.inference_mode()
def follow(model: Transformer, max_batch: int, context: int) -> None:
    """A follower rank's serving loop: the same KV cache as the leader's engine, the same
    calls, until the leader stops."""
    control = dist.new_group(backend="gloo", timeout=_IDLE)
    cache = KVCache(model.args, max_batch, min(context, model.args.max_seq_len), model.dtype,
                    model.device)
    header = torch.empty(3 + max_batch, dtype=torch.long)
    while True:
        dist.broadcast(header, 0, group=control)
        B, T, last_only = header[:3].tolist()
        if B == 0:
            return
        slots = header[3:3 + B].tolist()
        tokens, positions = torch.empty(B, T, dtype=torch.long), torch.empty(B, T, dtype=torch.long)
        for t in (tokens, positions):
            dist.broadcast(t, 0, group=control)
        try:
            model(tokens.to(model.device), positions.to(model.device), cache.rows(slots),
                  last_only=bool(last_only))
        except ValueError:  # bad input (e.g. past the cache): the leader fails the same way
            continue
