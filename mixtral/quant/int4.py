"""int4: 4-bit values in groups of `group_size` input columns, an fp32 scale and zero per group
(asymmetric: w ~ (q - 8) * scale + zero, q in 0..15).

On disk, the same bytes on every machine (layout "portable"):
  qweight           uint8 [..., N, K/2]: byte j of a row holds column 2j in its high nibble
                    and column 2j + 1 in its low nibble
  scales_and_zeros  fp32 [..., K/g, N, 2]: (scale, zero) of each group of g input columns

Packing for a processor's kernel happens at load, on the machine that runs the model: PyTorch's
int4 kernels get PyTorch's own packing function (`_convert_weight_to_int4pack_for_cpu`, whose
layout differs between AVX-512, AVX2 and other CPUs, or the CUDA one); our kernels
(mixtral.kernels) read the portable bytes as they are, on every tier. Files written by
mixtral 0.1 with `--layout cpu64` (a shuffle of these bytes, fixed, whatever machine wrote it)
are converted on load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixtral.quant.base import Format, Pair


def quantize(w: Tensor, group_size: int) -> Pair:
    """w [..., N, K] -> (uint8 [..., N, K/2] nibbles, fp32 scales_and_zeros [..., K/g, N, 2])."""
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


def unpack(packed: Tensor) -> Tensor:
    """Portable nibbles [..., N, K/2] -> values 0..15 uint8 [..., N, K] in column order."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).flatten(-2)


def dequantize(packed: Tensor, sz: Tensor, group_size: int) -> Tensor:
    """The float weight [..., N, K] that the int4 form stands for."""
    q = unpack(packed).float()
    *lead, N, K = q.shape
    scale, zero = sz.transpose(-3, -2).unbind(-1)  # [..., N, K/g]
    g = q.reshape(*lead, N, K // group_size, group_size)
    return ((g - 8) * scale[..., None] + zero[..., None]).reshape(*lead, N, K)


def from_cpu64(packed: Tensor) -> Tensor:
    """A legacy "cpu64" qweight [..., N, K/2] (N % 64 == 0) -> the portable bytes. That layout
    stored rows in blocks of 64, block b as [K/2, 64] bytes where byte (kk, 32*parity + n)
    held row n's column 2*kk + parity in its low nibble and row n + 32's in its high one."""
    *lead, N, half_k = packed.shape
    if N % 64:
        raise ValueError(f"a cpu64 int4 weight has rows in blocks of 64, this one {N} rows")
    t = packed.reshape(-1, N // 64, half_k, 2, 32)  # [m, b, kk, parity, n]
    q = torch.stack([t & 15, t >> 4], dim=-1).permute(0, 1, 5, 4, 2, 3)  # [m, b, half, n, kk, p]
    q = q.reshape(*lead, N, half_k, 2)
    return ((q[..., 0] << 4) | q[..., 1]).contiguous()


def to_cpu64(packed: Tensor) -> Tensor:
    """The inverse of from_cpu64 (tests write legacy files with it)."""
    *lead, N, half_k = packed.shape
    q = torch.stack([packed >> 4, packed & 15], dim=-1)  # [..., N, K/2, 2]
    t = q.reshape(-1, N // 64, 2, 32, half_k, 2).permute(0, 1, 4, 5, 3, 2)  # [m,b,kk,p,n,half]
    return (t[..., 0] | (t[..., 1] << 4)).reshape(*lead, N, half_k).contiguous()


class Int4Linear(nn.Module):
    """y = x @ W.T for an int4 W on PyTorch's kernels. It holds the portable bytes until its
    first call, which packs them with PyTorch's own function for this device and CPU and
    releases them (mixtral.fast reads the portable bytes before that, for our kernels)."""

    weight: Tensor
    scales_and_zeros: Tensor

    def __init__(self, packed: Tensor, sz: Tensor, group_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.group_size, self.packed = group_size, False
        self.register_buffer("weight", packed)  # portable uint8 [N, K/2], then the kernel's
        self.register_buffer("scales_and_zeros", sz.to(dtype))  # [K/g, N, 2]

    @torch.no_grad()
    def pack(self) -> None:
        if self.packed:
            return
        packed, sz = self.weight, self.scales_and_zeros
        pad = -self.out_features % 16  # the kernels take output sizes in multiples of 16
        if pad:  # zero rows with zero scales: they compute zeros, which are dropped
            packed, sz = F.pad(packed, (0, 0, 0, pad)), F.pad(sz, (0, 0, 0, pad))
        if packed.device.type == "cuda":
            self.weight = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
        else:
            q = unpack(packed).to(torch.int32)  # [N, K]
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.scales_and_zeros, self.packed = sz.contiguous(), True

    def forward(self, x: Tensor) -> Tensor:
        self.pack()
        x2 = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype)
        if x2.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight, self.group_size,
                                                   self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size,
                                                           self.scales_and_zeros)
        return y[:, :self.out_features].reshape(*x.shape[:-1], self.out_features)


INT4 = Format(
    bits=4, scales_name="scales_and_zeros", dtypes=(torch.uint8, torch.float32),
    shapes=lambda shape, group: ((*shape[:-1], shape[-1] // 2),
                                 (*shape[:-2], shape[-1] // group, shape[-2], 2)),
    quantize=quantize, dequantize=dequantize,
    linear=lambda q, s, group, dtype: Int4Linear(q, s, group, dtype),
    layouts={"portable": lambda q: q, "cpu64": from_cpu64},
)
