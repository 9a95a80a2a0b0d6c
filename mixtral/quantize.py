"""Weight-only int8 and int4 quantization, as module swaps on a built model.

Every matmul weight is quantized — attention (wq, wk, wv, wo), the output head and the expert
banks [E, out, in], which generic quantizers skip — and runs on PyTorch's native kernels:
`_weight_int8pack_mm` (int8, one scale per output row) and `_weight_int4pack_mm(_for_cpu)`
(int4, groups of `group_size` input columns with a scale and zero point each). Embeddings,
norms and the router stay in the model's dtype.

On disk a quantized checkpoint holds a portable form (int8 rows + scales; int4 as two nibbles per
byte, even column in the high nibble, + scales_and_zeros [K/group, N, 2]); the kernels' packed
layout depends on the device and is made when the model is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixtral.model import Transformer

GROUP_SIZES = (32, 64, 128, 256)


# --- tensors -------------------------------------------------------------------------------------

def int8_quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [..., N, K] -> (int8 [..., N, K], fp32 scales [..., N]); symmetric per output row."""
    w = w.float()
    scales = w.abs().amax(dim=-1).clamp(min=1e-12) / 127
    q = torch.round(w / scales[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def int4_quantize(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """w [..., N, K] -> (uint8 [..., N, K/2] nibbles, fp32 scales_and_zeros [..., K/g, N, 2]).

    Asymmetric per group: w ~ (q - 8) * scale + zero with q in 0..15."""
    *lead, N, K = w.shape
    if K % group_size:
        raise ValueError(f"int4: input size {K} is not a multiple of group size {group_size}")
    g = w.float().reshape(*lead, N, K // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # [..., N, K/g]
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    q = q.reshape(*lead, N, K)
    packed = (q[..., ::2] << 4) | q[..., 1::2]  # [..., N, K/2]
    zero = lo + 8 * scale
    sz = torch.stack([scale, zero], dim=-1).transpose(-3, -2)  # [..., K/g, N, 2]
    return packed.contiguous(), sz.contiguous()


def int4_dequantize(packed: Tensor, sz: Tensor, group_size: int) -> Tensor:
    """The float weight [..., N, K] that the int4 form stands for (tests and quality reports)."""
    q = torch.stack([packed >> 4, packed & 15], dim=-1).flatten(-2).float()  # [..., N, K]
    *lead, N, K = q.shape
    scale, zero = sz.transpose(-3, -2).unbind(-1)  # [..., N, K/g]
    g = q.reshape(*lead, N, K // group_size, group_size)
    return ((g - 8) * scale[..., None] + zero[..., None]).reshape(*lead, N, K)


# The CPU kernel's layout ("cpu64"), as a plain byte shuffle: rows in blocks of 64; block b is
# stored as [K/2, 64] bytes where byte (kk, 32*parity + n) holds row n's weight at column
# 2*kk + parity in its low nibble and row n + 32's in its high nibble. Checkpoints may store it
# (quantize --layout cpu64) so that CPU loads, and offloaded experts, need no conversion.

def int4_to_cpu64(packed: Tensor) -> Tensor:
    """Portable nibbles [N, K/2] (N % 64 == 0) -> the CPU kernel's layout, same shape."""
    N, half_k = packed.shape
    q = torch.stack([packed >> 4, packed & 15], dim=-1)  # [N, K/2, 2]: column 2kk + parity
    t = q.view(N // 64, 2, 32, half_k, 2).permute(0, 3, 4, 2, 1)  # [b, kk, parity, n, half]
    return (t[..., 0] | (t[..., 1] << 4)).reshape(N, half_k).contiguous()


def int4_from_cpu64(packed: Tensor) -> Tensor:
    """The inverse of int4_to_cpu64."""
    N, half_k = packed.shape
    t = packed.view(N // 64, half_k, 2, 32)  # [b, kk, parity, n]
    q = torch.stack([t & 15, t >> 4], dim=-1).permute(0, 4, 3, 1, 2)  # [b, half, n, kk, parity]
    q = q.reshape(N, half_k, 2)
    return ((q[..., 0] << 4) | q[..., 1]).contiguous()


def _kernel_int4(packed: Tensor, device: torch.device, layout: str = "portable") -> Tensor:
    """Stored nibbles [N, K/2] -> the int4 matmul kernel's layout on `device`."""
    if device.type == "cuda":
        if layout == "cpu64":
            packed = int4_from_cpu64(packed)
        return torch.ops.aten._convert_weight_to_int4pack(packed.to(device), 8)
    if layout == "cpu64":
        return packed  # already the kernel's layout
    if packed.shape[0] % 64 == 0:
        return int4_to_cpu64(packed)
    q = torch.stack([packed >> 4, packed & 15], dim=-1).flatten(-2).to(torch.int32)  # [N, K]
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)


def _int4_mm(x: Tensor, w: Tensor, group_size: int, sz: Tensor) -> Tensor:
    if x.device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm(x, w, group_size, sz)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, group_size, sz)


# --- modules -------------------------------------------------------------------------------------

class Int8Linear(nn.Module):
    weight: Tensor
    scales: Tensor

    def __init__(self, q: Tensor, scales: Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("weight", q)  # int8 [N, K]
        self.register_buffer("scales", scales.to(dtype))  # [N]

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.scales.dtype)
        if x2.requires_grad and torch.is_grad_enabled():  # LoRA on a frozen int8 base
            y = _Int8Matmul.apply(x2, self.weight, self.scales)
        else:
            y = _int8_mm(x2, self.weight, self.scales)
        return y.reshape(*x.shape[:-1], self.out_features)


def _int8_mm(x: Tensor, q: Tensor, scales: Tensor) -> Tensor:
    if x.device.type == "cuda":  # no CUDA kernel for int8pack: dequantize on the fly
        return F.linear(x, q.to(x.dtype)) * scales
    return torch.ops.aten._weight_int8pack_mm(x, q, scales)


class _Int8Matmul(torch.autograd.Function):
    """y = x (q * scales)^T with a gradient for x only: the int8 weight stays frozen, and
    earlier layers' adapters still learn through it (the kernel has no backward of its own)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, q: Tensor, scales: Tensor) -> Tensor:
        ctx.save_for_backward(q, scales)
        return _int8_mm(x, q, scales)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        q, scales = ctx.saved_tensors
        return (grad * scales) @ q.to(grad.dtype), None, None  # [M, N] x [N, K]


class Int4Linear(nn.Module):
    weight: Tensor
    scales_and_zeros: Tensor

    def __init__(self, packed: Tensor, sz: Tensor, group_size: int, dtype: torch.dtype,
                 layout: str = "portable") -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.group_size = group_size
        pad = -self.out_features % 16  # the kernels take output sizes in multiples of 16
        if pad:  # zero rows with zero scales: they compute zeros, which are dropped
            packed = F.pad(packed, (0, 0, 0, pad))
            sz = F.pad(sz, (0, 0, 0, pad))
        self.register_buffer("weight", _kernel_int4(packed, packed.device, layout))
        self.register_buffer("scales_and_zeros", sz.to(dtype))  # [K/g, N (padded), 2]

    def forward(self, x: Tensor) -> Tensor:
        y = _int4_mm(x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype),
                     self.weight, self.group_size, self.scales_and_zeros)
        return y[:, :self.out_features].reshape(*x.shape[:-1], self.out_features)


class QuantExperts(nn.Module):
    """Experts with each bank quantized; same call as `model.Experts` (rows sorted by expert)."""

    def __init__(self, banks: dict[str, tuple[Tensor, Tensor]], bits: int, group_size: int,
                 dtype: torch.dtype, layout: str = "portable") -> None:
        super().__init__()
        make = (lambda q, s: Int8Linear(q, s, dtype)) if bits == 8 else \
            (lambda q, s: Int4Linear(q, s, group_size, dtype, layout))
        for name in ("w1", "w2", "w3"):
            q, s = banks[name]
            setattr(self, name, nn.ModuleList(make(q[e], s[e]) for e in range(q.shape[0])))

    def expert(self, e: int, x: Tensor) -> Tensor:
        w1, w2, w3 = (cast(nn.ModuleList, getattr(self, w)) for w in ("w1", "w2", "w3"))
        return w2[e](F.silu(w1[e](x)) * w3[e](x))

    def forward(self, x: Tensor, counts: list[int]) -> Tensor:
        return torch.cat([self.expert(e, xe) for e, xe in enumerate(x.split(counts)) if len(xe)])


# --- whole models --------------------------------------------------------------------------------

Pair = tuple[Tensor, Tensor]  # (quantized weight, scales) in the portable form


def default_group_size(model_args: object) -> int:
    """The largest of 128/64/32 that divides every input size (dim, hidden, heads x head_dim)."""
    a = model_args
    sizes = (a.dim, a.hidden_dim, a.n_heads * a.head_dim)  # type: ignore[attr-defined]
    for g in (128, 64, 32):
        if all(k % g == 0 for k in sizes):
            return g
    raise ValueError(f"int4 needs input sizes divisible by 32, got {sizes}")


def quantize_weight(w: Tensor, bits: int, group_size: int) -> Pair:
    """Quantize [N, K] or a bank [E, N, K], one matrix at a time to bound the fp32 temporaries."""
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if w.dim() == 3:
        pairs = [quantize_weight(m, bits, group_size) for m in w]
        return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])
    return int8_quantize(w) if bits == 8 else int4_quantize(w, group_size)


def apply(model: Transformer, weight: Callable[[str], Pair], bits: int, group_size: int,
          dtype: torch.dtype, device: torch.device | str = "cpu", layout: str = "portable",
          experts: Callable[[int], nn.Module] | None = None) -> Transformer:
    """Swap every quantizable module for its quantized twin; `weight(canonical name)` returns
    the stored pair (quantizing a float weight, or reading one from a file). `experts(layer)`,
    when given, builds each layer's experts instead (offloading)."""
    device = torch.device(device)

    def pair(name: str) -> Pair:
        q, s = weight(name)
        return q.to(device), s.to(device)

    def linear(name: str) -> nn.Module:
        q, s = pair(name)
        return Int8Linear(q, s, dtype) if bits == 8 else \
            Int4Linear(q, s, group_size, dtype, layout)

    model.output = linear("output.weight")  # type: ignore[assignment]  # a module swap
    for i in range(len(model.layers)):
        for w in ("wq", "wk", "wv", "wo"):
            setattr(model.get_submodule(f"layers.{i}.attention"), w,
                    linear(f"layers.{i}.attention.{w}.weight"))
        moe = model.get_submodule(f"layers.{i}.feed_forward")
        if experts is not None:
            moe.experts = experts(i)
            continue
        banks = {w: pair(f"layers.{i}.feed_forward.experts.{w}") for w in ("w1", "w2", "w3")}
        moe.experts = QuantExperts(banks, bits, group_size, dtype, layout)
    return model


@torch.no_grad()
def quantize_model(model: Transformer, bits: int, group_size: int | None = None) -> Transformer:
    """Quantize a loaded float model in place, weight by weight."""
    group_size = group_size or default_group_size(model.args)
    embed = model.tok_embeddings.weight
    return apply(model, lambda name: quantize_weight(model.get_parameter(name), bits, group_size),
                 bits, group_size, embed.dtype, embed.device)
