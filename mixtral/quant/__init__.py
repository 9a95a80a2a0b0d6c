"""Weight-only int8 and int4 quantization, as module swaps on a built model.

Every matmul weight is quantized — attention (wq, wk, wv, wo), the output head and the expert
banks [E, out, in], which generic quantizers skip; embeddings, norms and the router stay in
the model's dtype. Each format is one module, declared as data (`base.Format`):

  int8  quant/int8.py  int8 per weight, an fp32 scale per output row
  int4  quant/int4.py  4-bit per weight, an fp32 scale and zero per group of input columns

A quantized checkpoint is config.json with "mixtral_quantization": {"bits", "group_size",
"layout"} and, per quantized weight, `<name>.qweight` and `<name>.<scales_name>` as the format
declares. The bytes mean the same on every machine; packing for a processor's kernels happens
at load, on the machine that runs the model.
`describe(model)` (quant/describe.py) reads a loaded model's quantization off its modules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mixtral.quant.base import Format, Pair, QuantExperts
from mixtral.quant.describe import describe
from mixtral.quant.int4 import INT4, Int4Linear
from mixtral.quant.int8 import INT8, Int8Linear

if TYPE_CHECKING:
    from mixtral.model import Transformer

__all__ = ["FORMATS", "GROUP_SIZES", "Format", "Int4Linear", "Int8Linear", "Pair",
           "QuantExperts", "apply", "default_group_size", "describe", "get", "quantize_model",
           "quantize_weight"]

FORMATS: dict[int, Format] = {f.bits: f for f in (INT8, INT4)}
GROUP_SIZES = (32, 64, 128, 256)


def get(bits: int) -> Format:
    if bits not in FORMATS:
        raise ValueError(f"bits must be one of {sorted(FORMATS)}, got {bits}")
    return FORMATS[bits]


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
    fmt = get(bits)
    if w.dim() == 3:
        pairs = [fmt.quantize(m, group_size) for m in w]
        return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])
    return fmt.quantize(w, group_size)


def apply(model: Transformer, weight: Callable[[str], Pair], bits: int, group_size: int,
          dtype: torch.dtype, device: torch.device | str = "cpu",
          experts: Callable[[int], nn.Module] | None = None) -> Transformer:
    """Swap every quantizable module for its quantized twin; `weight(canonical name)` returns
    the stored pair in the portable layout (quantizing a float weight, or reading one from a
    file). `experts(layer)`, when given, builds each layer's experts instead (offloading)."""
    fmt, device = get(bits), torch.device(device)

    def pair(name: str) -> Pair:
        q, s = weight(name)
        return q.to(device), s.to(device)

    def linear(name: str) -> nn.Module:
        return fmt.linear(*pair(name), group_size, dtype)

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
        moe.experts = QuantExperts(banks, fmt, group_size, dtype)
    return model


@torch.no_grad()
def quantize_model(model: Transformer, bits: int, group_size: int | None = None) -> Transformer:
    """Quantize a loaded float model in place, weight by weight."""
    group_size = group_size or default_group_size(model.args)
    return apply(model, lambda name: quantize_weight(model.get_parameter(name), bits, group_size),
                 bits, group_size, model.dtype, model.device)
