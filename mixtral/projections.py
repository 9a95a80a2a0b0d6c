"""The fast modules for one projection x @ W.T, made once from a built model's weights (the
swaps of mixtral.fast use them; `model.py`'s nn.Linear and mixtral.quant's modules are what
they must equal):

  PackedLinear   a float weight in oneDNN's packed layout (fp32 from AVX2, bf16 from AVX-512)
  Bf16Rows       a bf16 weight where oneDNN cannot pack bf16 (AVX2): our bf16 kernel for a few
                 rows of x, the weight widened to fp32 for a prompt
  Int8Rows, Int4Rows
                 the quantized modules on our own kernels (mixtral.kernels, CPU): a few rows on
                 the matrix-vector kernels, a prompt on dequantize + GEMM (float activations)
                 or the same integer kernels (int8 activations, AVX2)

`fuse` makes one module of several projections of the same input (wq/wk/wv, w1/w3), stacking
their outputs; `swap` is the fast twin of one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixtral import cpu, kernels
from mixtral.quant import Int4Linear, Int8Linear

SMALL_M = 16  # rows of x up to which the matrix-vector kernels beat dequantize + GEMM


def packable(weight: Tensor) -> bool:
    """oneDNN's packed layout: fp32 from AVX2 up, bf16 where oneDNN supports it (AVX-512)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    c = cpu.probe()
    return (weight.dtype == torch.float32 and c.at_least("avx2")) or \
        (weight.dtype == torch.bfloat16 and c.onednn_bf16)


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


class Bf16Rows(nn.Module):
    """y = x @ W.T for a bf16 W where oneDNN cannot pack bf16 (below AVX-512): our bf16 kernel
    (fp32 arithmetic) for a few rows of x; for a prompt, W widened to fp32 and the fp32 GEMM,
    because PyTorch's bf16 GEMM there runs ~3.7x slower than its fp32 one (512 x 1024 x 4096
    on the avx2 tier: 97 ms vs 26 ms, widening included). y comes back in bf16."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight.detach().contiguous()

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] > SMALL_M:
            y = F.linear(x2.float(), self.weight.float()).to(x.dtype)
        elif kernels.available():
            y = kernels.bf16_mv(x2, self.weight)
        else:
            y = F.linear(x2, self.weight)
        return y.reshape(*x.shape[:-1], self.out_features)


def widenable(weight: Tensor) -> bool:
    """A bf16 CPU weight on an x86 tier where oneDNN cannot pack it: Bf16Rows."""
    c = cpu.probe()
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and \
        c.at_least("avx2") and not c.onednn_bf16


def linear(weight: Tensor) -> nn.Module:
    if packable(weight):
        return PackedLinear(weight)
    if widenable(weight):
        return Bf16Rows(weight)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return layer


class QuantRows(nn.Module, ABC):
    """A quantized projection on mixtral.kernels: a matrix-vector kernel for a few rows of x,
    one dequantized copy and the float GEMM for a long prompt (on float activations; on int8
    ones the kernels take every length). y comes in the model dtype."""

    in_features: int
    out_features: int
    dtype: torch.dtype
    qx = False  # quantize x to int8 for the kernels' integer dot products (cpu.probe decides)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.dtype:
            x2 = x2.to(self.dtype)
        # on int8 activations the kernels' integer products beat dequantize + float GEMM at
        # every length (AVX2, 512 rows: 1.2-1.6x), so prompts take them too
        small = x2.shape[0] <= SMALL_M or self.qx
        y = self.mv(x2) if small else F.linear(x2, self.dense(x2.dtype))
        return y.reshape(*x.shape[:-1], self.out_features)

    @abstractmethod
    def mv(self, x: Tensor) -> Tensor:
        """x [M, K] -> y [M, N] on the matrix-vector kernels."""

    @abstractmethod
    def dense(self, dtype: torch.dtype) -> Tensor:
        """The float weight [N, K] this stands for (in a reused buffer: use it at once)."""


class Int8Rows(QuantRows):
    """Int8Linear on mixtral.kernels: y = x @ (weight * scales[:, None]).T."""

    def __init__(self, weight: Tensor, scales: Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        self.weight, self.scales = weight.contiguous(), scales.float().contiguous()

    def mv(self, x: Tensor) -> Tensor:
        return kernels.int8_mv(x, self.weight, self.scales, self.qx)

    def dense(self, dtype: torch.dtype) -> Tensor:
        return kernels.int8_dequantize(self.weight, self.scales, dtype)


class Int4Rows(QuantRows):
    """Int4Linear on mixtral.kernels (its layout: see there)."""

    def __init__(self, weight: Tensor, sz: Tensor, group_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape[0], weight.shape[1] * 2
        self.group_size, self.dtype = group_size, dtype
        self.weight, self.sz = weight.contiguous(), sz.contiguous()

    def mv(self, x: Tensor) -> Tensor:
        return kernels.int4_mv(x, self.weight, self.sz, self.group_size, self.qx)

    def dense(self, dtype: torch.dtype) -> Tensor:
        return kernels.int4_dequantize(self.weight, self.sz, self.group_size, dtype)


def _fits(m: nn.Module) -> bool:
    """Whether our kernels can take a quantized module's weight (and its layout)."""
    if m.weight.device.type != "cpu" or not kernels.available():  # type: ignore[union-attr]
        return False
    if type(m) is Int8Linear:
        return m.in_features % 16 == 0
    return type(m) is Int4Linear and not m.packed and m.in_features % 64 == 0 \
        and m.group_size % 64 == 0


def _rows(m: nn.Module) -> tuple[Tensor, Tensor]:
    """A quantized module's weight and scales in our kernels' layout (`_fits(m)`)."""
    if type(m) is Int8Linear:
        return m.weight, m.scales.float()
    assert type(m) is Int4Linear
    # the portable bytes as they are (before PyTorch would pack them for its kernel)
    sz = m.scales_and_zeros  # [K/g, N, 2], already in the module's dtype
    return m.weight, kernels.int4_scales(sz, sz.dtype)


def paged_int4(q: Tensor, sz: Tensor, group_size: int, dtype: torch.dtype) -> Int4Rows | None:
    """What `swap(Int4Linear(q, sz, group_size, dtype))` makes, straight from the
    file's pair, which nothing else holds (the bytes as read, the scales converted where they
    lie, without the module's copy of them: mixtral.offload pages experts in through it);
    None where our kernels cannot take it."""
    if q.device.type != "cpu" or not q.is_contiguous() or q.shape[-1] % 32 \
            or group_size % 64 or not kernels.available():
        return None
    own = sz.dtype == torch.float32 and sz.is_contiguous()  # as read: convert where it lies
    scales = kernels.int4_scales_(sz, dtype) if own else kernels.int4_scales(sz, dtype)
    rows = Int4Rows(q, scales, group_size, dtype)
    rows.qx = cpu.probe().activations == "int8"
    return rows


def fuse(*modules: nn.Module) -> nn.Module | None:
    """One module computing all of `modules` (stacked outputs): float ones packed, quantized
    ones on our kernels (one module's own bytes, as it holds them: no copy); None when they
    cannot be fused (LoRA, CUDA without kernels...)."""
    if all(type(m) is nn.Linear for m in modules):
        return linear(torch.cat([cast(nn.Linear, m).weight for m in modules]))
    kinds = {type(m) for m in modules}
    if len(kinds) != 1 or not kinds <= {Int8Linear, Int4Linear} \
            or not all(_fits(m) for m in modules):
        return None
    parts = [_rows(m) for m in modules]
    if len(parts) == 1:
        weight, scales = parts[0]
    else:
        weight, scales = (torch.cat([p[i] for p in parts]) for i in (0, 1))
    first = modules[0]
    rows: QuantRows
    if isinstance(first, Int8Linear):
        rows = Int8Rows(weight, scales, first.scales.dtype)
    else:
        assert isinstance(first, Int4Linear)
        rows = Int4Rows(weight, scales, first.group_size, first.scales_and_zeros.dtype)
    rows.qx = cpu.probe().activations == "int8"
    return rows


def swap(m: nn.Module) -> nn.Module:
    """The fast twin of one projection (itself if there is none)."""
    return fuse(m) or m
