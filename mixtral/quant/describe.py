"""`describe(model)`: what a loaded model is, read off its modules: its parameters (all, and
those one token uses), its weights' dtype, its weight-only quantization (format, group size,
whose kernels run it) and, when its experts are offloaded, the experts cache's budget and policy.

The model card (mixtral/server/routes.py) shows it; it lives here because only the
quantization code knows which module is which format. What the modules say is what runs: a
checkpoint's int4 that mixtral.fast moved onto our kernels reads "mixtral", one left on
PyTorch's `_weight_int4pack_mm` reads "pytorch".
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mixtral.config import param_counts
from mixtral.model import Runner
from mixtral.quant.int4 import Int4Linear
from mixtral.quant.int8 import Int8Linear


def describe(model: Runner) -> dict[str, Any]:
    """{"parameters", "active_parameters", "dtype", "quantization", "offload"}; the last two
    None for a float model and for experts held in memory. A model that is not a module (a
    parallel leader) is described by its config and dtype alone."""
    counts = param_counts(model.args)
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    return {"parameters": counts["total"], "active_parameters": counts["active"],
            # a bf16 model on a CPU without native bf16 computes in fp32 (mixtral.fast)
            "dtype": str(getattr(model, "weights_dtype", model.dtype)).removeprefix("torch."),
            "quantization": _quantization(modules),
            "offload": _offload(model)}


def _quantization(modules: list[nn.Module]) -> dict[str, Any] | None:
    """{"format": "int8" | "int4, groups of G" (the first quantized module's, in the model's
    order), "bits", "group_size" (None: int8 has a scale per row), "kernels": whose run the
    quantized modules ("mixtral": mixtral.kernels, "pytorch": PyTorch's int8/int4 ops),
    "formats": every format found (a GGUF file can mix them)}."""
    # mixtral.projections imports this package: its modules are named where they are needed
    from mixtral.projections import Int4Rows, Int8Rows

    kinds = ((Int8Linear, 8, "pytorch"), (Int8Rows, 8, "mixtral"),
             (Int4Linear, 4, "pytorch"), (Int4Rows, 4, "mixtral"))
    found = [(bits, getattr(m, "group_size", None) if bits == 4 else None, kernel)
             for m in modules for cls, bits, kernel in kinds if isinstance(m, cls)]
    if not found:
        return None
    bits, group, _ = found[0]
    formats = list(dict.fromkeys(_label(b, g) for b, g, _ in found))
    return {"format": formats[0], "bits": bits, "group_size": group,
            "kernels": sorted({k for *_, k in found}), "formats": formats}


def _label(bits: int, group: int | None) -> str:
    return "int8" if bits == 8 else f"int{bits}, groups of {group}"


def _offload(model: object) -> dict[str, Any] | None:
    """The experts cache that mixtral.offload.load_offloaded hangs on the model, if any:
    its byte budget for experts, its eviction policy and whether experts are read ahead."""
    cache = getattr(model, "expert_cache", None)
    if cache is None:
        return None
    return {"experts_budget_bytes": cache.budget, "policy": cache.policy.name,
            "prefetch": cache.reader is not None}
