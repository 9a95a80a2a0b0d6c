"""What each rank owns, and the module swaps that make a built model hold only that: the plan
(tensor and expert parallel sizes, this rank), and the attention and MoE layers that run on a
shard and end in one all-reduce summing the ranks' partial outputs.

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
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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
