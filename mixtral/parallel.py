"""Tensor- and expert-parallel inference over torch.distributed, as module swaps on a built
model (model.py knows nothing of it). Every rank holds the whole residual stream; what is split
is the weights, and each split layer ends in one all-reduce that sums the ranks' partial
outputs:

  tensor parallel (tp)   attention: rank r owns query heads [r*H/tp, (r+1)*H/tp) and their
                         key/value heads (wq/wk/wv column-split, wo row-split); when there are
                         fewer key/value heads than ranks, each rank keeps a copy of the one
                         its query heads share (as vLLM does). Experts, unless expert parallel:
                         each expert's hidden dimension F split (w1/w3 rows, w2 columns), as
                         gpt-fast does.
  expert parallel (ep)   rank r owns experts [r*E/ep, (r+1)*E/ep); the router runs everywhere
                         (it is tiny), each rank computes the (token, expert) pairs that fell
                         to its experts, and the all-reduce adds them up. Tokens are replicated,
                         so no all-to-all is needed: the "gather" form, right for the small
                         batches of decoding.

`--tp N` and `--ep N` may be combined over the same N ranks (attention split by heads, experts
by owner). Sums happen in another order than in one process, so logits agree to fp32
reduction-order error (tests/test_parallel.py states the bound), and greedy tokens agree.
The KV cache is the caller's as always: `model.args` on a rank describes its local heads.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mixtral.cache import KVCache
from mixtral.config import ModelArgs
from mixtral.model import Attention, Experts, MoeLayer, Transformer, route


class ParallelError(ValueError):
    """A parallel plan that does not fit the model or the launch."""


@dataclass(frozen=True)
class Plan:
    tp: int = 1
    ep: int = 1
    rank: int = 0

    @property
    def world(self) -> int:
        return max(self.tp, self.ep)

    def check(self, args: ModelArgs) -> None:
        """Clear errors, before any weight is read, for plans that cannot work."""
        if self.tp < 1 or self.ep < 1:
            raise ParallelError(f"--tp {self.tp} / --ep {self.ep}: sizes must be >= 1")
        if self.tp > 1 and self.ep > 1 and self.tp != self.ep:
            raise ParallelError(f"--tp {self.tp} with --ep {self.ep}: combined, both split "
                                "the same ranks, so they must be equal")
        if self.tp > 1:
            H, K = args.n_heads, args.n_kv_heads
            if H % self.tp:
                raise ParallelError(f"--tp {self.tp} does not divide the {H} attention heads")
            if K % self.tp and self.tp % K:
                raise ParallelError(f"--tp {self.tp} and the {K} key/value heads: one must "
                                    "divide the other")
            if self.ep == 1 and args.hidden_dim % self.tp:
                raise ParallelError(f"--tp {self.tp} does not divide the experts' hidden "
                                    f"dimension {args.hidden_dim}")
        if self.ep > 1 and args.num_experts % self.ep:
            raise ParallelError(f"--ep {self.ep} does not divide the {args.num_experts} experts")

    # --- what this rank owns -------------------------------------------------------------------

    def q_heads(self, args: ModelArgs) -> range:
        n = args.n_heads // self.tp
        return range(self.rank * n, (self.rank + 1) * n)

    def kv_heads(self, args: ModelArgs) -> range:
        if args.n_kv_heads >= self.tp:
            n = args.n_kv_heads // self.tp
            return range(self.rank * n, (self.rank + 1) * n)
        first = self.q_heads(args).start // (args.n_heads // args.n_kv_heads)
        return range(first, first + 1)  # fewer kv heads than ranks: a copy of the shared one

    def experts(self, args: ModelArgs) -> range:
        n = args.num_experts // self.ep
        return range(self.rank * n, (self.rank + 1) * n)

    def hidden(self, args: ModelArgs) -> range:
        n = args.hidden_dim // self.tp if self.ep == 1 else args.hidden_dim
        start = self.rank * n if self.ep == 1 else 0
        return range(start, start + n)

    def local_args(self, args: ModelArgs) -> ModelArgs:
        return dataclasses.replace(args, n_heads=len(self.q_heads(args)),
                                   n_kv_heads=len(self.kv_heads(args)))

    def slices(self, args: ModelArgs, suffix: str) -> tuple[range | None, int, range | None]:
        """For a canonical per-layer tensor: (experts kept or None, dim to cut, range on it)."""
        A = args.head_dim
        if suffix in ("attention.wq.weight", "attention.wo.weight") and self.tp > 1:
            h = self.q_heads(args)
            return None, 0 if suffix.endswith("wq.weight") else 1, range(h.start * A, h.stop * A)
        if suffix in ("attention.wk.weight", "attention.wv.weight") and self.tp > 1:
            h = self.kv_heads(args)
            return None, 0, range(h.start * A, h.stop * A)
        if suffix.startswith("feed_forward.experts."):
            experts = self.experts(args) if self.ep > 1 else None
            cut = self.hidden(args) if self.tp > 1 and self.ep == 1 else None
            return experts, 2 if suffix.endswith("w2") else 1, cut
        return None, 0, None


def _cut(t: Tensor, dim: int, keep: range | None) -> Tensor:
    return t if keep is None else t.narrow(dim, keep.start, len(keep))


class ShardedAttention(Attention):
    """The reference attention on this rank's heads; the output projection's partial sums
    are added over the ranks."""

    def __init__(self, args: ModelArgs, group: dist.ProcessGroup | None) -> None:
        super().__init__(args)
        self.group = group

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                positions: Tensor, cache: KVCache | None, layer: int) -> Tensor:
        out = super().forward(x, cos, sin, mask, positions, cache, layer)
        dist.all_reduce(out, group=self.group)
        return out


class ShardedMoe(MoeLayer):
    """The full router; this rank's experts (all of them, each with a slice of F, or a subset
    of whole ones) compute their (token, expert) pairs; the sum over ranks completes it."""

    def __init__(self, args: ModelArgs, experts: range, hidden: int,
                 group: dist.ProcessGroup | None) -> None:
        super().__init__(args)
        self.experts = Experts(len(experts), args.dim, hidden)
        self.first, self.owned, self.group = experts.start, len(experts), group

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        router_logits = self.gate(x)  # [N, E]
        weights, chosen = route(router_logits, self.top_k, x.dtype)
        local = chosen.flatten() - self.first  # [N*k] this rank's expert index of each pair
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(chosen.shape[1])
        mine = (local >= 0) & (local < self.owned)
        local, token, w = local[mine], token[mine], weights.flatten()[mine]
        order = local.argsort(stable=True)
        out = torch.zeros_like(x)
        if len(order):  # a rank none of whose experts was chosen still joins the all-reduce
            counts = torch.bincount(local[order]).tolist()
            y = self.experts(x[token[order]], counts) * w[order, None]  # [pairs, D]
            out.index_add_(0, token[order], y)
        dist.all_reduce(out, group=self.group)
        return out.view(shape), router_logits


def shard_modules(model: Transformer, plan: Plan, group: dist.ProcessGroup | None = None,
                  state: dict[str, Tensor] | None = None) -> Transformer:
    """Swap in the sharded modules (in place). Their weights are cut from the model's own
    (a model built whole, e.g. on one machine and then split), or taken from `state` (this
    rank's tensors as `read_shard` yields them) when the model is a skeleton on "meta"."""
    args = model.args
    plan.check(args)
    whole = {} if state is not None else {k: v for k, v in model.state_dict().items()}
    experts = plan.experts(args) if plan.ep > 1 else range(args.num_experts)
    for i, layer in enumerate(model.layers):
        prefix = f"layers.{i}."
        with torch.device("meta"):
            attention = ShardedAttention(plan.local_args(args), group) if plan.tp > 1 \
                else layer.attention
            moe = ShardedMoe(args, experts, len(plan.hidden(args)), group)
        if plan.tp > 1:
            layer.attention = attention
        layer.feed_forward = moe
        if state is None:
            for suffix in list(_suffixes(layer)):
                full = whole[prefix + suffix]
                keep, dim, cut = plan.slices(args, suffix)
                t = full if keep is None else full[keep.start:keep.stop]
                _assign(layer, suffix, _cut(t, dim, cut).clone())
    model.args = plan.local_args(args)
    if state is not None:
        model.load_state_dict(state, strict=True, assign=True)
    return model


def _suffixes(layer: nn.Module) -> list[str]:
    return [n for n, _ in layer.named_parameters()]


def _assign(module: nn.Module, name: str, value: Tensor) -> None:
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    setattr(module, leaf, nn.Parameter(value, requires_grad=False))


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


# --- launch ------------------------------------------------------------------------------------

def init(plan_tp: int, plan_ep: int, device: str = "cpu",
         timeout_s: float | None = None) -> Plan:
    """Join the torchrun launch (gloo on CPU, NCCL on CUDA) and return this rank's plan.
    A peer that dies or never arrives ends every rank with an error after `timeout_s`
    (MIXTRAL_DIST_TIMEOUT, default 120 s) instead of a hang."""
    if "WORLD_SIZE" not in os.environ:
        raise ParallelError(f"--tp {plan_tp} / --ep {plan_ep} need one process per rank: "
                            f"launch with torchrun --nproc-per-node {max(plan_tp, plan_ep)} "
                            "-m mixtral ...")
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    plan = Plan(plan_tp, plan_ep, rank)
    if world != plan.world:
        raise ParallelError(f"the launch has {world} processes but --tp {plan_tp} --ep {plan_ep} "
                            f"needs {plan.world}: run torchrun --nproc-per-node {plan.world}")
    seconds = timeout_s or float(os.environ.get("MIXTRAL_DIST_TIMEOUT", "120"))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    return plan


def join(tp: int, ep: int, device: str) -> tuple[Plan, str]:
    """Join the torchrun launch: this rank's plan and device (its GPU, LOCAL_RANK, under
    CUDA). Only rank 0 writes to stdout; the others follow it silently."""
    plan = init(tp, ep, device)
    if device.startswith("cuda"):
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(device)
    if plan.rank != 0:
        sys.stdout = open(os.devnull, "w")
    return plan, device


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
