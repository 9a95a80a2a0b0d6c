"""Fast paths, as module swaps on a built model; `model.py` stays the reference they must equal.

On CPU the big win is the weight layout: oneDNN's blocked ("packed") layout streams a bf16
matrix-vector product at ~95 % of memory bandwidth where the plain layout manages ~65 %, and
fp32 3x faster. So `optimize` repacks every matmul weight once, fusing wq/wk/wv into one matrix
and each expert's w1/w3 into one, and replaces the per-token bookkeeping of attention and the
MoE with fewer, larger operations:

  FastAttention  one qkv product, RoPE as a complex multiply
  FastMoe        few tokens (decode): the chosen experts are called directly, no sort/scatter
  PackedLinear   x @ W.T on the packed weight (CPU, bf16/fp32)

Quantized modules (mixtral.quantize) keep their own kernels; FastMoe and FastAttention work
with them too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixtral.cache import KVCache
from mixtral.model import Attention, Experts, MoeLayer, Transformer, dispatch, route


def packable(weight: Tensor) -> bool:
    return (weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and weight.dtype in (torch.float32, torch.bfloat16))


class PackedLinear(nn.Module):
    """y = x @ W.T with W in oneDNN's blocked layout (made once, for batch-1 products)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight,
                                               None, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)


def _linear(weight: Tensor) -> nn.Module:
    if packable(weight):
        return PackedLinear(weight)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return layer


def _fuse(*modules: nn.Module) -> nn.Module | None:
    """One linear layer computing all of `modules` (stacked outputs), when they are plain."""
    if not all(isinstance(m, nn.Linear) for m in modules):
        return None
    return _linear(torch.cat([cast(nn.Linear, m).weight for m in modules]))


class FastAttention(nn.Module):
    def __init__(self, ref: Attention) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = ref.n_heads, ref.n_kv_heads, ref.head_dim
        self.split = [ref.n_heads * ref.head_dim, ref.n_kv_heads * ref.head_dim,
                      ref.n_kv_heads * ref.head_dim]
        self.wqkv = _fuse(ref.wq, ref.wk, ref.wv)
        if self.wqkv is None:  # quantized projections: keep them apart
            self.wq, self.wk, self.wv = ref.wq, ref.wk, ref.wv
        self.wo = _linear(ref.wo.weight) if isinstance(ref.wo, nn.Linear) else ref.wo

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                positions: Tensor, cache: KVCache | None, layer: int) -> Tensor:
        B, T, _ = x.shape
        if self.wqkv is not None:
            q, k, v = self.wqkv(x).split(self.split, dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        rot = torch.complex(cos, sin)[:, :, None]  # [B, T, 1, A/2]
        q = _rope(q.view(B, T, self.n_heads, self.head_dim), rot).transpose(1, 2)
        k = _rope(k.view(B, T, self.n_kv_heads, self.head_dim), rot).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            assert mask is not None
            k, v = cache.update(layer, positions, k, v, span=mask.shape[-1])
        if T == 1 and mask is not None:  # decoding: CPU SDPA is slow for a single query
            out = _one_query_attention(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                 enable_gqa=self.n_heads != self.n_kv_heads)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


def _one_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """q [B, H, 1, A], k/v [B, K, S, A], mask [B, 1, 1, S] -> [B, H, 1, A]. Query head h uses
    key/value head h // (H/K), as SDPA's enable_gqa does; softmax in fp32."""
    B, H, _, A = q.shape
    K = k.shape[1]
    qg = q.reshape(B, K, H // K, A).float()  # [B, K, H/K, A]
    scores = torch.einsum("bkha,bksa->bkhs", qg, k.float()) * A**-0.5  # [B, K, H/K, S]
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    out = torch.einsum("bkhs,bksa->bkha", probs, v.float())
    return out.reshape(B, H, 1, A).to(q.dtype)


def _rope(x: Tensor, rot: Tensor) -> Tensor:
    """Adjacent pairs as complex numbers times e^(i*angle), in fp32 like the reference."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)


class PackedExperts(nn.Module):
    """Each expert's w1 and w3 fused into one packed [2F, D] matrix, w2 packed [D, F]."""

    def __init__(self, ref: Experts) -> None:
        super().__init__()
        self.hidden = ref.w1.shape[1]
        self.w13 = nn.ModuleList(_linear(torch.cat([ref.w1[e], ref.w3[e]]))
                                 for e in range(ref.w1.shape[0]))
        self.w2 = nn.ModuleList(_linear(ref.w2[e]) for e in range(ref.w2.shape[0]))

    def expert(self, e: int, x: Tensor) -> Tensor:
        gate, up = self.w13[e](x).split(self.hidden, dim=-1)
        return self.w2[e](F.silu(gate) * up)

    def forward(self, x: Tensor, counts: list[int]) -> Tensor:
        return torch.cat([self.expert(e, xe) for e, xe in enumerate(x.split(counts)) if len(xe)])


class FastMoe(nn.Module):
    """Mixtral's routing; when only a few tokens pass (decoding), the chosen experts are called
    directly instead of sorting and scattering."""

    def __init__(self, ref: MoeLayer, direct_below: int = 8) -> None:
        super().__init__()
        self.top_k, self.direct_below = ref.top_k, direct_below
        self.gate = _linear(ref.gate.weight) if isinstance(ref.gate, nn.Linear) else ref.gate
        experts = ref.experts
        self.experts = PackedExperts(experts) if isinstance(experts, Experts) and \
            packable(experts.w1) else experts

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        router_logits = self.gate(x)  # [N, E]
        weights, chosen = route(router_logits, self.top_k, x.dtype)
        if x.shape[0] >= self.direct_below:
            return dispatch(self.experts, x, weights, chosen).view(shape), router_logits
        expert = cast(Callable[[int, Tensor], Tensor], self.experts.expert)
        rows = []
        for n, picks in enumerate(chosen.tolist()):
            xn = x[n:n + 1]
            # ascending expert order, as the sorted dispatch adds them
            terms = sorted((e, j) for j, e in enumerate(picks))
            out = torch.zeros_like(xn)
            for e, j in terms:
                out = out + expert(e, xn) * weights[n, j]
            rows.append(out)
        return torch.cat(rows).view(shape), router_logits


@torch.no_grad()
def optimize(model: Transformer) -> Transformer:
    """Swap in the fast modules (in place); the reference weights are released as they are
    repacked, so memory does not grow. Subclasses of the reference modules (the sharded ones
    of mixtral.parallel) keep their forward; only their expert banks are packed."""
    for layer in model.layers:
        if type(layer.attention) is Attention:
            layer.attention = FastAttention(layer.attention)
        ff = layer.feed_forward
        if type(ff) is MoeLayer:
            layer.feed_forward = FastMoe(ff)
        elif isinstance(ff, MoeLayer) and type(ff.experts) is Experts and packable(ff.experts.w1):
            ff.experts = PackedExperts(ff.experts)  # type: ignore[assignment]
    if isinstance(model.output, nn.Linear):
        model.output = _linear(model.output.weight)  # type: ignore[assignment]
    return model
