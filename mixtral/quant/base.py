"""What every quantized format declares (`Format`), and the expert bank built from one.

A format is data: how a float matrix becomes the pair of tensors a file stores, their names,
shapes and dtypes, the file layouts it can read, and the module that multiplies by it. The
rest of the package (and checkpoint, offload, fast) asks the format instead of branching on
bits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixtral.model import ExpertBank

Pair = tuple[Tensor, Tensor]  # (quantized weight, its scales) as the file stores them


@dataclass(frozen=True)
class Format:
    bits: int
    scales_name: str  # on-disk suffix of the scales tensor (the weight's is "qweight")
    dtypes: tuple[torch.dtype, torch.dtype]  # of the stored weight and scales
    # weight shape [..., N, K] and group size -> (stored weight shape, stored scales shape)
    shapes: Callable[[tuple[int, ...], int], tuple[tuple[int, ...], tuple[int, ...]]]
    quantize: Callable[[Tensor, int], Pair]  # float [N, K], group -> stored pair
    dequantize: Callable[[Tensor, Tensor, int], Tensor]  # stored pair, group -> float [.., N, K]
    # the stored pair, group, compute dtype -> the module computing x @ W.T
    linear: Callable[[Tensor, Tensor, int, torch.dtype], nn.Module]
    # file layout -> the stored weight [..., N, K/...] in that layout -> the portable one
    layouts: dict[str, Callable[[Tensor], Tensor]]


class QuantExperts(ExpertBank):
    """Experts with each bank quantized: one quantized module per expert and matrix. The banks
    share one format and group size, or each has its own (`fmt` and `group_size` by bank name:
    a GGUF file often keeps gate/up in one type and down in another)."""

    def __init__(self, banks: dict[str, Pair], fmt: Format | dict[str, Format],
                 group_size: int | dict[str, int], dtype: torch.dtype) -> None:
        super().__init__()
        for name in ("w1", "w2", "w3"):
            q, s = banks[name]
            f = fmt[name] if isinstance(fmt, dict) else fmt
            g = group_size[name] if isinstance(group_size, dict) else group_size
            setattr(self, name, nn.ModuleList(f.linear(q[e], s[e], g, dtype)
                                              for e in range(q.shape[0])))

    @classmethod
    def of(cls, modules: dict[str, list[nn.Module]]) -> QuantExperts:
        """Experts of modules made elsewhere (mixtral.fast's, for an offloaded expert)."""
        self = cls.__new__(cls)
        ExpertBank.__init__(self)
        for name in ("w1", "w2", "w3"):
            setattr(self, name, nn.ModuleList(modules[name]))
        return self

    def expert(self, e: int, x: Tensor) -> Tensor:
        w1, w2, w3 = (getattr(self, w) for w in ("w1", "w2", "w3"))
        return w2[e](F.silu(w1[e](x)) * w3[e](x))
