"""Mixtral, the model: the spec in pure PyTorch. No I/O, no sampling, no device or dtype policy.

Shape legend used in the comments:
  B batch, T tokens in this call, S positions attended over (cache length or T), D model dim,
  H query heads, K key/value heads, A head dim, E experts, k experts per token, F expert hidden,
  N = B*T flattened tokens, V vocab.

Parameter names follow Mistral's reference (`wq`, `feed_forward.experts`, `w1`...), with each
layer's experts stacked into [E, out, in] banks so that grouped matmuls, quantization and LoRA
apply to the whole bank. RoPE rotates adjacent pairs (2i, 2i+1) as the reference does; the
Hugging Face layout's rotate-half convention is undone when its checkpoints are read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixtral.cache import CacheRows, KVCache
from mixtral.config import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32 (bf16 sums of squares lose too much), then back to x's dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin [B, T, A/2] in fp32 for integer positions [B, T]; cheap enough to redo per call."""
    exponent = torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)  # [A/2]
    angles = positions.float()[..., None] * inv_freq  # [B, T, A/2]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs of x [B, T, heads, A] by the position angles, in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))  # [B, T, heads, A/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                positions: Tensor, cache: KVCache | None, layer: int) -> Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # [B, T, H, A]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, K, A]
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, A]
        if cache is not None:
            assert mask is not None  # with a cache, the model always builds the mask
            k, v = cache.update(layer, positions, k, v, span=mask.shape[-1])  # [B, K, S, A]
        # mask None means plain causal attention over exactly these T tokens
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=self.n_heads != self.n_kv_heads)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # [B, T, H*A] -> [B, T, D]


class ExpertBank(nn.Module, ABC):
    """E experts run on rows grouped by expert: the call every expert bank shares (this float
    one, and the quantized, LoRA, offloaded and fused ones of the swaps); a bank says only how
    one expert computes and what it stores."""

    @abstractmethod
    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e on rows x [M, D] -> [M, D]."""

    def forward(self, x: Tensor, counts: list[int]) -> Tensor:
        """x [M, D] rows sorted by expert, counts[e] rows for expert e -> [M, D]."""
        # an expert no token chose costs nothing
        return torch.cat([self.expert(e, xe) for e, xe in enumerate(x.split(counts)) if len(xe)])


class Experts(ExpertBank):
    """E SwiGLU experts stacked as banks; each computes w2(silu(w1 x) * w3 x)."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))  # [E, F, D] gate
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))  # [E, D, F] down
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))  # [E, F, D] up

    def expert(self, e: int, x: Tensor) -> Tensor:
        h = F.silu(x @ self.w1[e].T) * (x @ self.w3[e].T)  # [M, F]
        return h @ self.w2[e].T


class MoeLayer(nn.Module):
    """Route each token to its top-k experts and sum their outputs, weighted by a softmax over
    the k chosen router logits in fp32 (Mistral's form; equal to HF's softmax-all-then-renorm)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.gate = nn.Linear(args.dim, args.num_experts, bias=False)
        self.experts: ExpertBank = Experts(args.num_experts, args.dim, args.hidden_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        router_logits = self.gate(x)  # [N, E]
        weights, chosen = route(router_logits, self.top_k, x.dtype)
        return dispatch(self.experts, x, weights, chosen).view(shape), router_logits


def route(router_logits: Tensor, top_k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """-> (weights [N, k] in dtype, chosen experts [N, k]): top-k logits, softmax over them."""
    top_logits, chosen = torch.topk(router_logits.float(), top_k, dim=-1)
    return F.softmax(top_logits, dim=-1).to(dtype), chosen


def dispatch(experts: ExpertBank, x: Tensor, weights: Tensor, chosen: Tensor) -> Tensor:
    """Group the N*k (token, expert) pairs by expert, run each expert once on its rows, add the
    weighted outputs back onto their tokens. x [N, D] -> [N, D]."""
    flat = chosen.flatten()  # [N*k]
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat).tolist()  # rows per expert, up to the last one chosen
    token = order // chosen.shape[1]  # token of each sorted pair
    y = experts(x[token], counts) * weights.flatten()[order, None]  # [N*k, D]
    return torch.zeros_like(x).index_add_(0, token, y)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = MoeLayer(args)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                positions: Tensor, cache: KVCache | None, layer: int) -> tuple[Tensor, Tensor]:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, positions, cache, layer)
        moe_out, router_logits = self.feed_forward(self.ffn_norm(h))
        return h + moe_out, router_logits


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    # the embeddings are never quantized or sharded: their dtype is the activations' (and the
    # KV cache's), their device the one every input goes to
    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init for training from scratch: N(0, std) matrices, unit norm weights."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)

    def forward(self, tokens: Tensor, positions: Tensor | None = None,
                cache: KVCache | None = None, *, last_only: bool = False,
                return_router_logits: bool = False, hidden: bool = False,
                only: Tensor | None = None) -> Tensor | tuple[Tensor, list[Tensor]]:
        """tokens [B, T] -> fp32 logits [B, T, V] ([B, 1, V] with last_only).

        positions [B, T] are each token's absolute position (default 0..T-1). With a cache, this
        call's keys/values are written at those positions and every query attends to the cached
        positions at or before its own, so one call can be a prefill, a decode step or a chunk.
        return_router_logits also returns each layer's router logits [N, E] (for training).
        hidden returns the final normed states [B, T, D] in place of the logits (for a loss
        that scores them against some of the output rows: train/losses.py). only, a boolean
        [B, T] mask, keeps just those positions, flattened: [M, V] (or [M, D]); training needs
        no logits where no loss counts, and the output head is most of a small model's cost.
        """
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        cos, sin = rope_cos_sin(positions, self.args.head_dim, self.args.rope_theta)
        mask = None  # plain causal attention over these T tokens
        if cache is not None:  # cache slot s holds position s
            key_pos = torch.arange(cache.span(positions), device=tokens.device)  # [S]
            mask = attention_mask(positions, key_pos, self.args.sliding_window)
        elif self.args.sliding_window is not None:
            mask = attention_mask(positions, positions[:, None, None, :], self.args.sliding_window)
        h = self.tok_embeddings(tokens)  # [B, T, D]
        router_logits = []
        for i, layer in enumerate(self.layers):
            h, logits = layer(h, cos, sin, mask, positions, cache, i)
            router_logits.append(logits)
        if last_only:
            h = h[:, -1:]
        if only is not None:
            h = h[only]  # [M, D]
        h = self.norm(h)
        logits = h if hidden else self.output(h).float()  # [B, T, V]
        return (logits, router_logits) if return_router_logits else logits


class Runner(Protocol):
    """What the engine and the decode loops need of a model: the Transformer itself, or
    parallel.Leader (which announces each call to the other ranks, then makes it)."""

    args: ModelArgs

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def __call__(self, tokens: Tensor, positions: Tensor, cache: KVCache | CacheRows, *,
                 last_only: bool = False) -> Any: ...


def attention_mask(positions: Tensor, key_pos: Tensor, window: int | None) -> Tensor:
    """Boolean [B, 1, T, S] mask: the query at position p sees keys at p-window < j <= p.

    key_pos holds the keys' positions, broadcastable to [B, 1, 1, S]."""
    q = positions[:, None, :, None]  # [B, 1, T, 1]
    mask = key_pos <= q
    if window is not None:
        mask = mask & (key_pos > q - window)
    return mask
