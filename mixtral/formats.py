"""Checkpoint formats as data: config readers/writers, key tables and the one q/k permutation.

Our canonical state dict uses Mistral's names with each layer's experts stacked:
`layers.{l}.feed_forward.experts.w1` [E, F, D] and so on. A layout says, for every canonical
tensor, which file tensor(s) hold it and which fixed transform maps one to the other:

  same       the file tensor is the canonical tensor
  rope       q/k rows in Hugging Face's rotate-half order; permuted to adjacent pairs
  stack      one file tensor per expert (`{e}` in the key), stacked along a new dim 0
  gate/up    halves of HF's fused `gate_up_proj` [E, 2F, D] (gate = w1 first, up = w3 second)
  flat       experts concatenated along rows, [E*F, D] (the hub's consolidated.0X.pt)
  flat_t     the same, but stored transposed ([E*F, D] for a [E, D, F] bank)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mixtral import quant
from mixtral.config import ModelArgs
from mixtral.configs import ConfigError


# canonical name -> shape, per layer where the name has {l}
def canonical_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    D, V, E, F = args.dim, args.vocab_size, args.num_experts, args.hidden_dim
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    per_layer: dict[str, tuple[int, ...]] = {
        "attention_norm.weight": (D,),
        "attention.wq.weight": (q, D),
        "attention.wk.weight": (kv, D),
        "attention.wv.weight": (kv, D),
        "attention.wo.weight": (D, q),
        "ffn_norm.weight": (D,),
        "feed_forward.gate.weight": (E, D),
        "feed_forward.experts.w1": (E, F, D),
        "feed_forward.experts.w2": (E, D, F),
        "feed_forward.experts.w3": (E, F, D),
    }
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (V, D)}
    for layer in range(args.n_layers):
        shapes.update({f"layers.{layer}.{k}": v for k, v in per_layer.items()})
    shapes.update({"norm.weight": (D,), "output.weight": (V, D)})
    return shapes


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    # canonical key suffix (after `layers.{l}.` for per-layer ones) -> (file key, transform)
    table: dict[str, tuple[str, str]]

    def source(self, canonical: str) -> tuple[str, str, int | None]:
        """canonical name -> (file key template with {e} left in, transform, layer)."""
        if canonical.startswith("layers."):
            _, layer, suffix = canonical.split(".", 2)
            key, transform = self.table[suffix]
            return key.replace("{l}", layer), transform, int(layer)
        key, transform = self.table[canonical]
        return key, transform, None


_HF_COMMON = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", "same"),
    "norm.weight": ("model.norm.weight", "same"),
    "output.weight": ("lm_head.weight", "same"),
    "attention_norm.weight": ("model.layers.{l}.input_layernorm.weight", "same"),
    "attention.wq.weight": ("model.layers.{l}.self_attn.q_proj.weight", "rope"),
    "attention.wk.weight": ("model.layers.{l}.self_attn.k_proj.weight", "rope"),
    "attention.wv.weight": ("model.layers.{l}.self_attn.v_proj.weight", "same"),
    "attention.wo.weight": ("model.layers.{l}.self_attn.o_proj.weight", "same"),
    "ffn_norm.weight": ("model.layers.{l}.post_attention_layernorm.weight", "same"),
}
_MISTRAL_COMMON = {
    "tok_embeddings.weight": ("tok_embeddings.weight", "same"),
    "norm.weight": ("norm.weight", "same"),
    "output.weight": ("output.weight", "same"),
    "attention_norm.weight": ("layers.{l}.attention_norm.weight", "same"),
    "attention.wq.weight": ("layers.{l}.attention.wq.weight", "same"),
    "attention.wk.weight": ("layers.{l}.attention.wk.weight", "same"),
    "attention.wv.weight": ("layers.{l}.attention.wv.weight", "same"),
    "attention.wo.weight": ("layers.{l}.attention.wo.weight", "same"),
    "ffn_norm.weight": ("layers.{l}.ffn_norm.weight", "same"),
}
_HF_MOE = "model.layers.{l}.block_sparse_moe"

LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    Layout("hf", "Hugging Face safetensors, one tensor per expert (the hub's files)", {
        **_HF_COMMON,
        "feed_forward.gate.weight": (f"{_HF_MOE}.gate.weight", "same"),
        **{f"feed_forward.experts.{w}": (f"{_HF_MOE}.experts.{{e}}.{w}.weight", "stack")
           for w in ("w1", "w2", "w3")},
    }),
    Layout("hf-fused", "Hugging Face safetensors, fused expert banks (transformers v5 in memory)", {
        **_HF_COMMON,
        "feed_forward.gate.weight": ("model.layers.{l}.mlp.gate.weight", "same"),
        "feed_forward.experts.w1": ("model.layers.{l}.mlp.experts.gate_up_proj", "gate"),
        "feed_forward.experts.w3": ("model.layers.{l}.mlp.experts.gate_up_proj", "up"),
        "feed_forward.experts.w2": ("model.layers.{l}.mlp.experts.down_proj", "same"),
    }),
    Layout("mistral", "Mistral consolidated (params.json + consolidated.safetensors or .pth)", {
        **_MISTRAL_COMMON,
        "feed_forward.gate.weight": ("layers.{l}.feed_forward.gate.weight", "same"),
        **{f"feed_forward.experts.{w}": (f"layers.{{l}}.feed_forward.experts.{{e}}.{w}.weight",
                                         "stack") for w in ("w1", "w2", "w3")},
    }),
    Layout("mistral-fused", "Mistral's original release (consolidated.0X.pt, fused experts)", {
        **_MISTRAL_COMMON,
        "feed_forward.gate.weight": ("layers.{l}.block_sparse_moe.gate.weight", "same"),
        "feed_forward.experts.w1": ("layers.{l}.block_sparse_moe.w1", "flat"),
        "feed_forward.experts.w3": ("layers.{l}.block_sparse_moe.w3", "flat"),
        "feed_forward.experts.w2": ("layers.{l}.block_sparse_moe.w2", "flat_t"),
    }),
)}

# A key that only one layout has, to tell layouts apart by what a file holds (never by its name).
_SIGNATURES = {
    "hf": "model.layers.0.block_sparse_moe.experts.0.w1.weight",
    "hf-fused": "model.layers.0.mlp.experts.gate_up_proj",
    "mistral": "layers.0.feed_forward.experts.0.w1.weight",
    "mistral-fused": "layers.0.block_sparse_moe.w1",
}


def detect_layout(keys: set[str]) -> Layout | None:
    found = [name for name, key in _SIGNATURES.items() if key in keys]
    return LAYOUTS[found[0]] if len(found) == 1 else None


# --- the q/k permutation -------------------------------------------------------------------------
# HF rotates (i, i + A/2) within each head, Mistral rotates (2i, 2i+1). HF's converter reorders
# the rows of wq/wk so the same weights give the same attention; these two undo and redo it.

def rope_hf_to_mistral(w: Tensor, head_dim: int) -> Tensor:
    heads = w.shape[0] // head_dim
    return w.view(heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(w.shape)


def rope_mistral_to_hf(w: Tensor, head_dim: int) -> Tensor:
    heads = w.shape[0] // head_dim
    return w.view(heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def file_tensors(layout: Layout, args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint in this layout must hold, with its shape."""
    out: dict[str, tuple[int, ...]] = {}
    E = args.num_experts
    for name, shape in canonical_shapes(args).items():
        key, transform, _ = layout.source(name)
        if transform == "stack":
            out.update({key.format(e=e): shape[1:] for e in range(E)})
        elif transform in ("gate", "up"):
            out[key] = (E, 2 * shape[1], shape[2])
        elif transform == "flat":
            out[key] = (E * shape[1], shape[2])
        elif transform == "flat_t":
            out[key] = (E * shape[2], shape[1])
        else:
            out[key] = shape
    return out


def read_canonical(layout: Layout, args: ModelArgs, read: Callable[[str], Tensor],
                   make: Callable[[tuple[int, ...]], Tensor]) -> Iterator[tuple[str, Tensor]]:
    """Yield (canonical name, tensor), one at a time. `read(file_key)` returns a file tensor
    (already checked for shape and dtype); `make(shape)` allocates the destination, so that
    stacking experts never holds more than the model plus one file tensor."""
    for name, shape in canonical_shapes(args).items():
        yield name, read_one(layout, args, read, make, name, shape)


def read_one(layout: Layout, args: ModelArgs, read: Callable[[str], Tensor],
             make: Callable[[tuple[int, ...]], Tensor], name: str, shape: tuple[int, ...],
             experts: range | None = None) -> Tensor:
    """One canonical tensor of `shape`; for an expert bank, only `experts` (default: all), and
    in layouts that keep one tensor per expert only theirs are read."""
    key, transform, _ = layout.source(name)
    if transform == "stack":
        chosen = experts or range(args.num_experts)
        dest = make((len(chosen), *shape[1:]))
        for i, e in enumerate(chosen):
            dest[i].copy_(read(key.format(e=e)))
        return dest
    if experts is not None:  # fused banks are one file tensor: read it, keep the experts asked
        return read_one(layout, args, read, make, name, shape)[experts.start:experts.stop].clone()
    if transform == "same":
        return _into(make(shape), read(key))
    dest = make(shape)
    if transform == "rope":
        dest.copy_(rope_hf_to_mistral(read(key), args.head_dim))
    elif transform in ("gate", "up"):
        half = shape[1]
        src = read(key)  # [E, 2F, D]
        dest.copy_(src[:, :half] if transform == "gate" else src[:, half:])
    elif transform == "flat":
        dest.copy_(read(key).view(shape))
    elif transform == "flat_t":
        E, D, F = shape
        dest.copy_(read(key).view(E, F, D).transpose(1, 2))
    return dest


def _into(dest: Tensor, src: Tensor) -> Tensor:
    # A fresh file tensor of the right dtype and device is used as is: no second copy.
    if dest.dtype == src.dtype and dest.device == src.device and not dest.is_meta:
        return src
    return dest.copy_(src)


def write_canonical(layout: Layout, args: ModelArgs,
                    state: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """Yield (file key, contiguous tensor) for the split layouts we write (hf, mistral)."""
    for name in canonical_shapes(args):
        key, transform, _ = layout.source(name)
        t = state[name]
        if transform == "same":
            yield key, t.contiguous()
        elif transform == "rope":
            yield key, rope_mistral_to_hf(t, args.head_dim).contiguous()
        elif transform == "stack":
            for e in range(args.num_experts):
                yield key.format(e=e), t[e].clone()
        else:
            raise ValueError(f"writing the {layout.name!r} layout is not supported; "
                             f"write 'hf' or 'mistral'")


# --- quantized checkpoints (our own layout: canonical names) -------------------------------------

QUANTIZATION_KEY = "mixtral_quantization"  # in config.json: {"bits": 8|4, "group_size": g}
QUANTIZED = Layout("mixtral-quantized", "mixtral's weight-only int8/int4 checkpoint "
                   "(canonical names; see mixtral.quantize)", {})
_QUANTIZED_SUFFIXES = (".wq.weight", ".wk.weight", ".wv.weight", ".wo.weight",
                       ".experts.w1", ".experts.w2", ".experts.w3")


def is_quantized_weight(name: str) -> bool:
    """The matmul weights that int8/int4 replace; embeddings, norms and router stay float."""
    return name == "output.weight" or name.endswith(_QUANTIZED_SUFFIXES)


def portable_names(name: str, bits: int) -> tuple[str, str]:
    """On-disk names of a quantized weight and of its scales."""
    base = name.removesuffix(".weight")
    return f"{base}.qweight", f"{base}.{quant.get(bits).scales_name}"


def quantized_tensors(args: ModelArgs, dtype: torch.dtype,
                      settings: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of a quantized checkpoint, in writing order, with shape and dtype."""
    fmt, group = quant.get(settings["bits"]), settings["group_size"]
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, shape in canonical_shapes(args).items():
        if not is_quantized_weight(name):
            out[name] = (shape, dtype)
            continue
        qname, sname = portable_names(name, fmt.bits)
        (qshape, sshape), (qdtype, sdtype) = fmt.shapes(shape, group), fmt.dtypes
        out[qname], out[sname] = (qshape, qdtype), (sshape, sdtype)
    return out


def check_quantization(settings: object, source: str) -> dict[str, Any]:
    """config.json's quantization settings, checked against the formats (and their layouts)."""
    bits = settings.get("bits") if isinstance(settings, dict) else None
    fmt = quant.FORMATS.get(bits) if isinstance(bits, int) else None
    if fmt is None or not isinstance(settings, dict) or \
            not isinstance(settings.get("group_size"), int) or \
            settings.get("layout", "portable") not in fmt.layouts or \
            (fmt.bits == 4 and settings["group_size"] not in quant.GROUP_SIZES):
        raise ConfigError(f"{source}: {QUANTIZATION_KEY} must be {{\"bits\": 8 or 4, "
                          f'"group_size": {" or ".join(map(str, quant.GROUP_SIZES))} (int4), '
                          f'"layout": "portable"}}, got {settings!r}')
    return {"bits": fmt.bits, "group_size": settings["group_size"],
            "layout": settings.get("layout", "portable")}
