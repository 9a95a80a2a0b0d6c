"""GGML's tensor types (what a GGUF file stores) into ours: float as stored, the 4-bit types
whose grid is ours mapped exactly, the others dequantized and quantized again, the loss kept.

Our int4 (quant/int4.py) is w = (q - 8) * scale + zero per group of input columns, q in 0..15;
three GGML types are that same grid over groups of 32, so their values move across unchanged:

  Q4_0  w = d * (q - 8)                 scale = d,       zero = 0
  Q4_1  w = d * q + m                   scale = d,       zero = m + 8d
  Q4_K  w = d*sc * q - dmin*m (per 32)  scale = d * sc,  zero = 8 * d * sc - dmin * m

(only the nibbles' order within a block differs; scale and zero are computed in fp32, as the
kernels use them). Every other type is dequantized by the gguf package and quantized again:
into int8 with one scale per row when it has more than 4.5 bits a weight (Q5_*, Q6_K, Q8_0:
our int8 has no per-block scales), else into int4 in groups of 32 (Q2_K, Q3_K, IQ*). Each such
tensor's relative error ||w - w'|| / ||w|| is added up per type in a `Loss`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
from torch import Tensor

from mixtral import quant

T = GGMLQuantizationType
FLOATS = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
EXACT_INT4 = (T.Q4_0, T.Q4_1, T.Q4_K)
GROUP = 32  # the group size of the exact mappings, and of int4 re-quantization


@dataclass(frozen=True)
class Stored:
    """One weight in our terms: a float tensor, or a quantized pair of `bits` (and group)."""
    bits: int  # 0: float
    tensors: tuple[Tensor, ...]  # (float,) or (qweight, scales)
    group: int = 0


@dataclass
class Loss:
    """Per (GGML type, our form): tensors seen, and for re-quantized ones the squared error
    and squared norm summed, whose ratio is the relative RMS error."""
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    error: dict[tuple[str, str], float] = field(default_factory=dict)
    norm: dict[tuple[str, str], float] = field(default_factory=dict)

    def add(self, kind: T, target: str, w: Tensor | None = None, w2: Tensor | None = None) -> None:
        key = (kind.name, target)
        self.counts[key] = self.counts.get(key, 0) + 1
        if w is not None and w2 is not None:
            self.error[key] = self.error.get(key, 0.0) + float((w - w2).square().sum())
            self.norm[key] = self.norm.get(key, 0.0) + float(w.square().sum())

    def relative(self, kind: str, target: str) -> float | None:
        """The relative RMS error of a re-quantized type (None: stored exactly)."""
        key = (kind, target)
        return (self.error[key] / self.norm[key]) ** 0.5 if self.norm.get(key) else None

    def summary(self) -> str:
        parts = []
        for (kind, target), n in self.counts.items():
            err = self.relative(kind, target)
            how = "exact" if err is None else f"re-quantized, relative RMS error {100 * err:.2f}%"
            parts.append(f"{kind} x{n} -> {target} ({how})")
        return "; ".join(parts)


def bits_per_weight(kind: T) -> float:
    block, size = GGML_QUANT_SIZES[kind]
    return 8 * size / block


def target_bits(kind: T) -> int:
    """Our format for a quantized type: int4 for the exact ones and those of at most 4.5 bits
    a weight, else int8."""
    return 4 if kind in EXACT_INT4 or bits_per_weight(kind) <= 4.5 else 8


def form(kind: T, matmul: bool) -> tuple[str, bool]:
    """-> (what a tensor of this type becomes, whether exactly): `matmul` weights go to our
    nearest format; embeddings, norms and the router (and the banks of a layer whose other
    banks are float) are dequantized into float, which holds every ggml value exactly."""
    if kind in FLOATS:
        return "float", True
    if not matmul:
        return "float, dequantized", True
    if kind in EXACT_INT4:
        return f"int4, groups of {GROUP}", True
    return ("int8, a scale per row" if target_bits(kind) == 8 else f"int4, groups of {GROUP}"), \
        False


def as_float(data: np.ndarray, kind: T, shape: tuple[int, ...]) -> Tensor:
    """Any stored tensor as a float tensor of `shape` (float types keep their dtype)."""
    if kind in FLOATS:  # copied out of the file's memory map, bytes as they are
        raw = torch.from_numpy(np.array(data, copy=True).view(np.uint8).reshape(-1))
        return raw.view(FLOATS[kind]).reshape(shape)
    return torch.from_numpy(quants.dequantize(np.asarray(data), kind)).reshape(shape)


def convert(data: np.ndarray, kind: T, shape: tuple[int, ...], loss: Loss) -> Stored:
    """A matmul weight [..., N, K] as stored in the file, in the nearest of our forms."""
    target, exact = form(kind, matmul=True)
    if kind in FLOATS:
        loss.add(kind, target)
        return Stored(0, (as_float(data, kind, shape),))
    if exact:
        q, scale, zero = _int4_grid(np.asarray(data), kind, shape)
        loss.add(kind, target)
        return Stored(4, pack_int4(q, scale, zero), GROUP)
    w = as_float(data, kind, shape)
    bits = target_bits(kind)
    q2, s2 = quant.quantize_weight(w, bits, GROUP)
    loss.add(kind, target, w, quant.get(bits).dequantize(q2, s2, GROUP))
    return Stored(bits, (q2, s2), GROUP if bits == 4 else 0)


def _int4_grid(data: np.ndarray, kind: T, shape: tuple[int, ...]) -> tuple[Tensor, ...]:
    """-> (q uint8 [..., N, K] in 0..15, scale and zero fp32 [..., N, K/32])."""
    block, size = GGML_QUANT_SIZES[kind]
    blocks = data.view(np.uint8).reshape(-1, size)
    n = blocks.shape[0]
    if kind == T.Q4_K:
        d = blocks[:, 0:2].view(np.float16).astype(np.float32)
        dmin = blocks[:, 2:4].view(np.float16).astype(np.float32)
        sc, m = quants.Q4_K.get_scale_min(blocks[:, 4:16])
        scale = d * sc.astype(np.float32)  # [n, 8]: one per 32 weights
        zero = 8 * scale - dmin * m.astype(np.float32)
        qs = blocks[:, 16:].reshape(n, 4, 1, 32)  # 4 chunks of 64: low nibbles, then high
    else:
        d = blocks[:, 0:2].view(np.float16).astype(np.float32)
        scale, zero = d, np.zeros_like(d)
        if kind == T.Q4_1:
            zero = blocks[:, 2:4].view(np.float16).astype(np.float32) + 8 * d
        qs = blocks[:, size - 16:].reshape(n, 1, 1, 16)  # 32 weights: low nibbles, then high
    q = (qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & np.uint8(15)
    lead = shape[:-1]
    return (torch.from_numpy(q.reshape(*lead, shape[-1])),
            torch.from_numpy(np.ascontiguousarray(scale).reshape(*lead, -1)),
            torch.from_numpy(np.ascontiguousarray(zero).reshape(*lead, -1)))


def pack_int4(q: Tensor, scale: Tensor, zero: Tensor) -> tuple[Tensor, Tensor]:
    """Values 0..15 [..., N, K] and their groups' scale and zero [..., N, K/g] -> our portable
    int4 pair (quant/int4.py: high nibble first; scales_and_zeros [..., K/g, N, 2])."""
    packed = (q[..., ::2] << 4) | q[..., 1::2]
    sz = torch.stack([scale, zero], dim=-1).transpose(-3, -2)
    return packed.contiguous(), sz.contiguous()
