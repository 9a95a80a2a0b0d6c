"""int8: one int8 per weight, one fp32 scale per output row (symmetric, w ~ q * scale).

On disk: `qweight` int8 [..., N, K] and `scales` fp32 [..., N]; the same bytes on every
machine, used as they are by PyTorch's `_weight_int8pack_mm` and by our kernels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixtral.quant.base import Format, Pair


def quantize(w: Tensor, group_size: int = 0) -> Pair:
    """w [..., N, K] -> (int8 [..., N, K], fp32 scales [..., N]); symmetric per output row."""
    w = w.float()
    scales = w.abs().amax(dim=-1).clamp(min=1e-12) / 127
    q = torch.round(w / scales[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize(q: Tensor, scales: Tensor, group_size: int = 0) -> Tensor:
    return q.float() * scales.float()[..., None]


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


INT8 = Format(
    bits=8, scales_name="scales", dtypes=(torch.int8, torch.float32),
    shapes=lambda shape, group: (shape, shape[:-1]),
    quantize=quantize, dequantize=dequantize,
    linear=lambda q, s, group, dtype: Int8Linear(q, s, dtype),
    layouts={"portable": lambda q: q},
)
