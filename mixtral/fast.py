"""Fast paths, as module swaps on a built model; `model.py` stays the reference they must equal.

On CPU the big win is the weight layout: oneDNN's blocked ("packed") layout streams a bf16
matrix-vector product at ~95 % of memory bandwidth where the plain layout manages ~65 %, and
fp32 3x faster. So `optimize` repacks every matmul weight once, fusing wq/wk/wv into one matrix
and each expert's w1/w3 into one, and replaces the per-token bookkeeping of attention and the
MoE with fewer, larger operations:

  FastAttention  one qkv product, RoPE as one complex multiply for queries and keys
  FastMoe        few tokens (decode): the chosen experts are called directly, no sort/scatter
  FastRMSNorm    the norm as one op of our kernels, bit for bit the reference's
  projections    (mixtral/projections.py) every matmul weight packed for oneDNN, or on our
                 kernels (bf16 below AVX-512, int8, int4), projections of one input fused

Where a kernel is unavailable (CUDA, MIXTRAL_KERNELS=0, no compiler) the quantized modules
keep PyTorch's kernels; FastMoe and FastAttention work with them too.

A decoding step is small: the bench model's int4 step streams ~0.4 GB of weights in a few
milliseconds, and each PyTorch operation dispatched from Python costs a few microseconds
whatever its size. So on our kernels a step's attention, MoE (routing included) and norms are
one op each, given tensors in the shapes the model holds them, without reshapes around them
(benchmarks/step_overhead.py counts what a step dispatches).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixtral import cpu, kernels
from mixtral.cache import KVCache
from mixtral.model import (
    Attention,
    ExpertBank,
    Experts,
    MoeLayer,
    RMSNorm,
    Transformer,
    dispatch,
    route,
)
from mixtral.projections import (
    SMALL_M,
    Bf16Rows,
    Int4Rows,
    Int8Rows,
    QuantRows,
    fuse,
    linear,
    packable,
    paged_int4,
    swap,
    widenable,
)
from mixtral.quant import Format, Int4Linear, Int8Linear, Pair, QuantExperts


class FastAttention(nn.Module):
    def __init__(self, ref: Attention, window: int | None = None) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = ref.n_heads, ref.n_kv_heads, ref.head_dim
        self.window = window  # the model's sliding window (None: none)
        self.wqkv = fuse(ref.wq, ref.wk, ref.wv)
        if self.wqkv is None:  # e.g. LoRA on them: keep them apart
            self.wq, self.wk, self.wv = ref.wq, ref.wk, ref.wv
        self.wo = swap(ref.wo)
        # decoding steps on the fused kernel (mixtral.kernels) where it runs: CPU, fp32/bf16
        device = next(itertools.chain(ref.parameters(), ref.buffers())).device
        self.fused_step = device.type == "cpu" and kernels.available()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                positions: Tensor, cache: KVCache | None, layer: int) -> Tensor:
        B, T, _ = x.shape
        H, K, A = self.n_heads, self.n_kv_heads, self.head_dim
        if self.wqkv is not None:
            qkv = project(self.wqkv, x)
        else:
            qkv = torch.cat([self.wq(x), self.wk(x), self.wv(x)], dim=-1)
        # decoding: one row attends to every cached position unless a window cuts it
        decode_mask = None
        if T == 1 and mask is not None:
            span = mask.shape[-1]
            if B > 1 or (self.window is not None and span > self.window):
                decode_mask = mask
        if T == 1 and cache is not None and mask is not None and self.fused_step:
            k_store, v_store, rows = cache.layer(layer)
            if qkv.dtype == k_store.dtype and qkv.dtype in (torch.float32, torch.bfloat16):
                # qkv [B, 1, N], cos/sin [B, 1, A/2], positions [B, 1] as they are: the kernel
                # reads them so -> [B, 1, H*A]
                out = kernels.decode_attention(qkv, cos, sin, k_store, v_store, rows, positions,
                                               decode_mask, span, H, K)
                return project(self.wo, out)
        # queries and keys rotate together: [B, T, H + K, A]
        qk = _rope(qkv[..., :(H + K) * A].view(B, T, H + K, A), torch.complex(cos, sin)[:, :, None])
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # [B, heads, T, A]
        v = qkv[..., (H + K) * A:].view(B, T, K, A).transpose(1, 2)
        if cache is not None:
            assert mask is not None
            k, v = cache.update(layer, positions, k, v, span=mask.shape[-1])
        if T == 1 and mask is not None:  # decoding: CPU SDPA is slow for a single query
            out = _one_query_attention(q, k, v, decode_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                 enable_gqa=H != K)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


def project(m: nn.Module, x: Tensor) -> Tensor:
    """m(x) for a projection. A quantized one on a decoding step's rows goes straight to its
    kernel, which takes x [..., K] as it is: QuantRows.forward would do the same product with
    a reshape dispatched on each side of it."""
    if isinstance(m, QuantRows) and x.dtype == m.dtype and \
            (m.qx or x.numel() <= SMALL_M * m.in_features):
        return m.mv(x)
    return m(x)


def _one_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """q [B, H, 1, A], k/v [B, K, S, A], mask [B, 1, 1, S] or None (all visible) ->
    [B, H, 1, A]. Query head h uses key/value head h // (H/K), as SDPA's enable_gqa does;
    softmax in fp32."""
    B, H, _, A = q.shape
    K = k.shape[1]
    qg = q.reshape(B, K, H // K, A).float() * A**-0.5  # [B, K, H/K, A]
    scores = qg @ k.float().transpose(-1, -2)  # [B, K, H/K, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v.float()  # [B, K, H/K, A]
    return out.reshape(B, H, 1, A).to(q.dtype)


def _rope(x: Tensor, rot: Tensor) -> Tensor:
    """Adjacent pairs as complex numbers times e^(i*angle), in fp32 like the reference."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)


class FusedExperts(ExpertBank):
    """Each expert's w1 and w3 fused into one [2F, D] projection, w2 its fast twin. Experts on
    our kernels (int8, int4, and bf16 below AVX-512) are also stacked into banks [E, ...] (the
    modules hold views of them), so that a decoding step's MoE is one kernel call (`decode`)."""

    def __init__(self, w13: list[nn.Module], w2: list[nn.Module], hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.w13, self.w2 = nn.ModuleList(w13), nn.ModuleList(w2)
        self.banks: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self.bits = self.group = 0
        self.qx = any(getattr(m, "qx", False) for m in w13)
        for kind, bits in ((Int8Rows, 8), (Int4Rows, 4), (Bf16Rows, 16)):
            if all(type(m) is kind for m in w13 + w2) and kernels.available():
                self.banks = (*_stack(w13), *_stack(w2))  # type: ignore[assignment]
                self.bits, self.group = bits, getattr(w13[0], "group_size", 0)

    def expert(self, e: int, x: Tensor) -> Tensor:
        gate, up = self.w13[e](x).split(self.hidden, dim=-1)
        return self.w2[e](F.silu(gate) * up)

    def decode(self, x: Tensor, chosen: Tensor, weights: Tensor) -> Tensor:
        """x [M, D] (a few rows), chosen/weights [M, k] -> the MoE output [M, D]."""
        assert self.banks is not None
        return kernels.moe_decode(x, chosen, weights, *self.banks, self.bits, self.group,
                                  self.qx)

    def route(self, x: Tensor, router_logits: Tensor, top_k: int) -> Tensor:
        """x [..., D] (a few rows) and its router logits [..., E] -> the MoE output [..., D],
        routed as model.route does, in the same op as `decode`."""
        assert self.banks is not None
        return kernels.moe_route(x, router_logits, top_k, *self.banks, self.bits, self.group,
                                 self.qx)


def _stack(modules: list[nn.Module]) -> tuple[Tensor, Tensor]:
    """One bank per tensor of the quantized modules; each module then holds views of it."""
    names = {Int8Rows: ("weight", "scales"), Int4Rows: ("weight", "sz"),
             Bf16Rows: ("weight",)}[type(modules[0])]  # type: ignore[index]
    banks = tuple(torch.stack([getattr(m, n) for m in modules]) for n in names)
    for e, m in enumerate(modules):
        for n, bank in zip(names, banks, strict=True):
            setattr(m, n, bank[e])
    if len(banks) == 1:  # bf16: no scales
        banks = (banks[0], torch.empty(0))
    return banks  # type: ignore[return-value]


def fuse_experts(ref: nn.Module) -> FusedExperts | None:
    """The fast form of a float (packed) or quantized (our kernels) expert bank, if any."""
    if type(ref) is Experts and (packable(ref.w1) or widenable(ref.w1)):
        E = ref.w1.shape[0]
        return FusedExperts([linear(torch.cat([ref.w1[e], ref.w3[e]])) for e in range(E)],
                            [linear(ref.w2[e]) for e in range(E)], ref.w1.shape[1])
    if type(ref) is QuantExperts:
        w1, w2, w3 = (cast(nn.ModuleList, getattr(ref, w)) for w in ("w1", "w2", "w3"))
        w13 = [fuse(a, b) for a, b in zip(w1, w3, strict=True)]
        down = [fuse(m) for m in w2]
        if all(m is not None for m in w13 + down):
            return FusedExperts(cast(list[nn.Module], w13), cast(list[nn.Module], down),
                                cast(Int8Linear | Int4Linear, w1[0]).out_features)
    return None


def page_in(banks: dict[str, Pair], fmt: Format, group_size: int, dtype: torch.dtype,
            fallback: Callable[[dict[str, Pair]], nn.Module]) -> nn.Module:
    """A paged-in expert (mixtral.offload: each matrix's pair as just read, portable) on our
    kernels, each projection on its own: int4 as paged_int4 makes it, int8 as `swap` does;
    `fallback` (PyTorch's modules) where our kernels cannot take it. Not fused as resident
    banks are (fuse_experts): that copies a Mixtral expert's ~100 MB twice, and packing then
    took 2.4x its read (benchmarks/offload.py --profile); through Int4Linear first, 2x this."""
    if fmt.bits == 4:
        rows = {w: paged_int4(q, s, group_size, dtype) for w, (q, s) in banks.items()}
        if all(r is not None for r in rows.values()):
            return QuantExperts.of({w: [cast(nn.Module, r)] for w, r in rows.items()})
    experts = fallback(banks)
    if type(experts) is QuantExperts:
        for name in ("w1", "w2", "w3"):
            bank = cast(nn.ModuleList, getattr(experts, name))
            for e, m in enumerate(bank):
                bank[e] = swap(m)
    return experts


class FastMoe(nn.Module):
    """Mixtral's routing; when only a few tokens pass (decoding), the chosen experts are called
    directly instead of sorting and scattering."""

    def __init__(self, ref: MoeLayer, direct_below: int = 8) -> None:
        super().__init__()
        self.top_k, self.direct_below = ref.top_k, direct_below
        self.gate = linear(ref.gate.weight) if isinstance(ref.gate, nn.Linear) else ref.gate
        self.experts = fuse_experts(ref.experts) or ref.experts

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = x.shape
        few = x.numel() < self.direct_below * shape[-1]
        if few and isinstance(self.experts, FusedExperts) and self.experts.banks is not None:
            # routing and experts in one op, on x [..., D] as it is
            router_logits = self.gate(x)  # [..., E]
            return (self.experts.route(x, router_logits, self.top_k),
                    router_logits.view(-1, router_logits.shape[-1]))
        x = x.reshape(-1, shape[-1])  # [N, D]
        router_logits = self.gate(x)  # [N, E]
        weights, chosen = route(router_logits, self.top_k, x.dtype)
        if not few:
            return dispatch(self.experts, x, weights, chosen).view(shape), router_logits
        expert = self.experts.expert
        rows: list[Tensor] = []
        for n, (picks, w) in enumerate(zip(chosen.tolist(), weights.tolist(), strict=True)):
            # ascending expert order, as dispatch adds them
            terms = [expert(e, x[n:n + 1]) * wj for e, wj in sorted(zip(picks, w, strict=True))]
            out = terms[0]
            for term in terms[1:]:
                out = out + term
            rows.append(out)
        return (rows[0] if len(rows) == 1 else torch.cat(rows)).view(shape), router_logits


class FastRMSNorm(RMSNorm):
    """RMSNorm as one op of our kernels (csrc/norm.cpp: bit for bit the reference, whose eight
    operations cost more than the arithmetic at a decoding step's size)."""

    def forward(self, x: Tensor) -> Tensor:
        # the op has no backward: where a gradient is wanted, the reference computes
        grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if not grad and x.dtype == self.weight.dtype and \
                x.dtype in (torch.float32, torch.bfloat16):
            return kernels.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


def fast_norm(ref: RMSNorm) -> RMSNorm:
    """The fast twin of a CPU RMSNorm where our kernels run (itself otherwise)."""
    if type(ref) is not RMSNorm or ref.weight.device.type != "cpu" or not kernels.available():
        return ref
    norm = FastRMSNorm(ref.weight.shape[0], ref.eps)
    norm.weight = ref.weight
    return norm


@torch.no_grad()
def optimize(model: Transformer) -> Transformer:
    """Swap in the fast modules (in place); the reference weights are released as they are
    repacked, so memory grows by one layer's at most. Subclasses of the reference modules (the
    sharded ones of mixtral.parallel) keep their forward; only their expert banks are packed."""
    for layer in model.layers:
        layer.attention_norm = fast_norm(cast(RMSNorm, layer.attention_norm))
        layer.ffn_norm = fast_norm(cast(RMSNorm, layer.ffn_norm))
        if type(layer.attention) is Attention:
            layer.attention = FastAttention(layer.attention, model.args.sliding_window)
        ff = layer.feed_forward
        if type(ff) is MoeLayer:
            layer.feed_forward = FastMoe(ff)
        elif isinstance(ff, MoeLayer):
            ff.experts = fuse_experts(ff.experts) or ff.experts
    model.norm = fast_norm(model.norm)
    model.output = swap(model.output)  # type: ignore[assignment]
    fp32 = _fp32_compute(model)
    if fp32:  # the model card names the weights' dtype, not the wider one they compute in
        model.weights_dtype = model.dtype  # type: ignore[assignment]
    cache = getattr(model, "expert_cache", None)
    if cache is not None:  # offloaded experts (mixtral.offload): each one paged in goes fast too
        plain = cache.page_in
        cache.page_in = lambda banks: _compute_in(
            page_in(banks, cache.fmt, cache.group_size, cache.dtype, plain), fp32)
    return cast(Transformer, _compute_in(model, fp32))


def _fp32_compute(model: Transformer) -> bool:
    """A bf16 model on a CPU without native bf16 (below AVX-512) runs its activations in fp32,
    weights staying bf16/int8/int4: PyTorch's bf16 operations there (its GEMM 0.7 GFLOP/s on
    the avx2 tier, attention, norms) are several times slower than fp32 ones. Only when every
    matmul weight is in a module that takes fp32 input (not under LoRA, say)."""
    if model.dtype != torch.bfloat16 or model.device.type != "cpu" or cpu.probe().onednn_bf16 \
            or not cpu.probe().at_least("avx2"):
        return False
    small = (nn.Embedding, RMSNorm)
    return all(isinstance(m, small) for m in model.modules()
               if any(t.dtype == torch.bfloat16 for t in
                      itertools.chain(m.parameters(recurse=False), m.buffers(recurse=False))))


def _compute_in(module: nn.Module, fp32: bool) -> nn.Module:
    """Embeddings, norms and the quantized modules' activations in fp32 (see _fp32_compute)."""
    if fp32:
        for m in module.modules():
            if isinstance(m, QuantRows):
                m.dtype = torch.float32
            elif isinstance(m, (nn.Embedding, RMSNorm)):
                m.float()
    return module


def describe_paths() -> dict[str, str]:
    """`mixtral info --system`: this CPU (mixtral.cpu) and the path each kind of weight takes."""
    c, ours = cpu.probe(), kernels.available()
    out = cpu.describe()
    out["kernels"] = (f"ours, the {c.tier} build" if ours else
                      f"PyTorch's only ({kernels.why_not()})")
    out["fp32"] = "oneDNN packed layout" if c.at_least("avx2") else "PyTorch's linear"
    out["bf16"] = ("oneDNN packed layout" if c.onednn_bf16 else
                   f"{'our bf16 kernel' if ours else 'PyTorch bf16 linear'} for decoding, "
                   "widened to fp32 for prompts" if c.at_least("avx2") else
                   "PyTorch's bf16 linear")
    prompts = "the same for prompts" if c.activations == "int8" else \
        "dequantize + GEMM for prompts"
    out["int8/int4"] = (f"our kernels for decoding (and the MoE and attention step) on "
                        f"{c.activations} activations, {prompts}" if ours else
                        "PyTorch's _weight_int8pack_mm / _weight_int4pack_mm_for_cpu, int4 "
                        "packed at load by PyTorch for this CPU")
    return out
