"""LoRA as module swaps: low-rank adapters on attention (wq, wk, wv, wo) and on every expert
(w1, w2, w3 of each bank), trained alone on a frozen base, saved small, merged back.
It sits beside the other inference swaps (quant, offload, fast, parallel) because serving uses
it too: `--lora ADAPTER` merges an adapter at load (mixtral.assemble); training (train/run.py)
adds fresh adapters and saves them.

W x + (alpha / r) * B A x with A ~ small random, B = 0: a fresh adapter changes nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mixtral.model import Attention, ExpertBank, Experts, Transformer

ATTENTION = ("wq", "wk", "wv", "wo")


def _dtype(base: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The compute dtype of a float or int8 (quantize.Int8Linear) layer."""
    weight = cast(Tensor, base.weight)
    t = weight if weight.is_floating_point() else cast(Tensor, base.scales)
    return t.dtype, t.device


class LoRALinear(nn.Module):
    """On an nn.Linear, or on a frozen quantize.Int8Linear (QLoRA-style training)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        self.base, self.rank, self.scaling = base, rank, alpha / rank
        dtype, device = _dtype(base)
        n_out, n_in = cast(Tensor, base.weight).shape
        self.lora_a = nn.Parameter(torch.empty(rank, n_in, dtype=dtype, device=device))
        self.lora_b = nn.Parameter(torch.zeros(n_out, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scaling

    def merged(self) -> nn.Module:
        if not cast(Tensor, self.base.weight).is_floating_point():
            raise ValueError("an adapter merges into float weights, not int8 ones: load the "
                             "base in bf16/fp32 (mixtral lora merge BASE ADAPTER DST)")
        cast(Tensor, self.base.weight).data += (self.lora_b @ self.lora_a) * self.scaling
        return self.base


class LoRAExperts(ExpertBank):
    """A rank-r adapter per expert and per matrix: A [E, r, in], B [E, out, r]; the base is
    model.Experts (weight banks) or an int8 quantize.QuantExperts (one Int8Linear each)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        self.base, self.rank, self.scaling = base, rank, alpha / rank
        self.quantized = not isinstance(base, Experts)
        for name in ("w1", "w2", "w3"):
            if self.quantized:
                first = getattr(base, name)[0]
                (n_out, n_in), (dtype, device) = first.weight.shape, _dtype(first)
                E = len(getattr(base, name))
            else:
                w = getattr(base, name)  # [E, out, in]
                (E, n_out, n_in), dtype, device = w.shape, w.dtype, w.device
            a = torch.empty(E, rank, n_in, dtype=dtype, device=device)
            for e in range(E):
                nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
            self.register_parameter(f"{name}_a", nn.Parameter(a))
            self.register_parameter(f"{name}_b", nn.Parameter(
                torch.zeros(E, n_out, rank, dtype=dtype, device=device)))

    def _mm(self, name: str, e: int, x: Tensor) -> Tensor:
        a = cast(Tensor, getattr(self, f"{name}_a"))[e]
        b = cast(Tensor, getattr(self, f"{name}_b"))[e]
        base = getattr(self.base, name)[e]  # an Int8Linear, or a float [out, in] matrix
        y = cast(Tensor, base(x) if self.quantized else x @ base.T)
        return y + (x @ a.T) @ b.T * self.scaling

    def expert(self, e: int, x: Tensor) -> Tensor:
        return self._mm("w2", e, F.silu(self._mm("w1", e, x)) * self._mm("w3", e, x))

    def merged(self) -> nn.Module:
        if self.quantized:
            raise ValueError("an adapter merges into float weights, not int8 ones: load the "
                             "base in bf16/fp32 (mixtral lora merge BASE ADAPTER DST)")
        for name in ("w1", "w2", "w3"):
            a, b = getattr(self, f"{name}_a"), getattr(self, f"{name}_b")
            getattr(self.base, name).data += torch.bmm(b, a) * self.scaling
        return self.base


def apply_lora(model: Transformer, rank: int = 16, alpha: float = 32.0,
               targets: tuple[str, ...] = ("attention", "experts")) -> list[nn.Parameter]:
    """Freeze the model and add adapters; returns the trainable (adapter) parameters."""
    model.requires_grad_(False)
    for layer in model.layers:
        attention = cast(Attention, layer.attention)
        if "attention" in targets:
            for name in ATTENTION:
                setattr(attention, name, LoRALinear(getattr(attention, name), rank, alpha))
        if "experts" in targets:
            moe = cast(nn.Module, layer.feed_forward)
            moe.experts = LoRAExperts(cast(nn.Module, moe.experts), rank, alpha)
    return [cast(nn.Parameter, p) for p in lora_parameters(model).values()]


def lora_parameters(model: Transformer) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if _is_adapter(n)}


def _is_adapter(name: str) -> bool:
    return ".lora_" in name or (".experts.w" in name and name.endswith(("_a", "_b")))


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight and remove it."""
    for layer in model.layers:
        attention = layer.attention
        for name in ATTENTION:
            module = getattr(attention, name)
            if isinstance(module, LoRALinear):
                setattr(attention, name, module.merged())
        moe = cast(nn.Module, layer.feed_forward)
        if isinstance(moe.experts, LoRAExperts):
            moe.experts = moe.experts.merged()
    return model


def save_adapter(model: Transformer, path: str | Path, rank: int, alpha: float,
                 targets: tuple[str, ...]) -> None:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().contiguous() for n, p in lora_parameters(model).items()}
    save_file(tensors, out / "adapter.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(
        {"rank": rank, "alpha": alpha, "targets": list(targets)}, indent=2) + "\n")


def load_adapter(model: Transformer, path: str | Path) -> Transformer:
    """Add the adapter saved at `path` to `model` (its base), ready to run or merge."""
    folder = Path(path)
    config = json.loads((folder / "adapter_config.json").read_text())
    apply_lora(model, config["rank"], config["alpha"], tuple(config["targets"]))
    tensors = load_file(folder / "adapter.safetensors")
    params = lora_parameters(model)
    missing, unknown = set(params) - set(tensors), set(tensors) - set(params)
    if missing or unknown:
        raise ValueError(f"{folder}: adapter does not fit this model (missing "
                         f"{sorted(missing)[:3]}, unknown {sorted(unknown)[:3]})")
    with torch.no_grad():
        for name, t in tensors.items():
            if t.shape != params[name].shape:
                raise ValueError(f"{folder}: {name} has shape {list(t.shape)}, the model needs "
                                 f"{list(params[name].shape)}")
            params[name].copy_(t)
    return model
