"""A checkpoint's config checked against its own tensor index, before anything is built from it.

The config's counts decide how much work and memory loading takes: the table of expected
tensors has one entry per layer and expert, the model one module per layer. A 300-byte config
saying `num_hidden_layers: 1000000` used to cost minutes and gigabytes before its error. Here
the layer and expert counts are compared with what the headers hold (names and the router's
shape), which are bounded by the files' size, so every later step is too; the numbers that no
tensor shows (the context length) get a sane bound instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from mixtral.checkfile import CheckpointError, TensorEntry
from mixtral.config import ModelArgs
from mixtral.formats import QUANTIZED, Layout

# Far beyond any Mixtral (32k) or its successors (64k-128k); a KV cache or a RoPE table sized
# from a larger number would be an allocation proportional to a lie in the file.
MAX_CONTEXT = 2**22

_LAYER = re.compile(r"(?:^|\.)layers\.(\d{1,9})\.")
_EXPERT = re.compile(r"\.experts\.(\d{1,9})\.")
_ROUTER = "layers.0.feed_forward.gate.weight"  # canonical name; every layout stores a router


def _field(config_file: Path, name: str) -> str:
    """The config's own name for a ModelArgs field, for error messages."""
    hf = {"n_layers": "num_hidden_layers", "num_experts": "num_local_experts",
          "max_seq_len": "max_position_embeddings"}
    mistral = {"num_experts": "moe.num_experts"}
    return (hf if config_file.name == "config.json" else mistral).get(name, name)


def _indices(names: Iterable[str], pattern: re.Pattern[str]) -> set[int]:
    return {int(m.group(1)) for name in names if (m := pattern.search(name))}


def _is_range(found: set[int], n: int) -> bool:
    """found == set(range(n)), without building a set of a size read from the config."""
    return len(found) == n and (n == 0 or max(found) == n - 1)


def _describe(found: set[int], what: str) -> str:
    if not found:
        return f"no {what}s"
    if _is_range(found, len(found)):
        return f"{len(found)} {what}s (0 to {len(found) - 1})"
    shown = sorted(found)
    return f"{what}s {', '.join(map(str, shown[:6]))}{', ...' if len(shown) > 6 else ''}"


def check_config(config_file: Path, args: ModelArgs, layout: Layout,
                 entries: Mapping[str, TensorEntry]) -> None:
    """Raise CheckpointError where the config's counts contradict the weights (or are absurd);
    the shapes of each tensor are compared later, once the expected table is known small."""
    if args.max_seq_len > MAX_CONTEXT:
        raise CheckpointError(f"{config_file}: {_field(config_file, 'max_seq_len')} is "
                              f"{args.max_seq_len}, over the bound of {MAX_CONTEXT} tokens")
    layers = _indices(entries, _LAYER)
    if not _is_range(layers, args.n_layers):
        raise CheckpointError(f"{config_file}: {_field(config_file, 'n_layers')} is "
                              f"{args.n_layers}, but the weights hold {_describe(layers, 'layer')}")
    router = _ROUTER if layout is QUANTIZED else layout.source(_ROUTER)[0]
    if router in entries and entries[router].shape[:1] != (args.num_experts,):
        raise CheckpointError(f"{config_file}: {_field(config_file, 'num_experts')} is "
                              f"{args.num_experts}, but the router {router} has shape "
                              f"{list(entries[router].shape)}")
    # layouts with one tensor per expert: the expected table grows with the expert count
    if any(transform == "stack" for _, transform in layout.table.values()):
        experts = _indices(entries, _EXPERT)
        if not _is_range(experts, args.num_experts):
            raise CheckpointError(f"{config_file}: {_field(config_file, 'num_experts')} is "
                                  f"{args.num_experts}, but the weights hold "
                                  f"{_describe(experts, 'expert')}")
