"""mixtral: the Mixtral 8x7B system in PyTorch — model, checkpoints, chat, generation.

Stable API: `mixtral.load(path, dtype=None, device="cpu")` and `mixtral.chat.encode(messages)`.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from mixtral import cpu, threads

cpu.cap_torch()  # MIXTRAL_ISA reaches PyTorch and oneDNN only if set before torch starts
threads.set_policy()  # OpenMP's wait policy, likewise read once when torch starts

if TYPE_CHECKING:
    import torch

    from mixtral.model import Transformer

__version__ = "0.1.0"


def load(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
         device: torch.device | str = "cpu", max_ram: str | int | None = None,
         kv_cache_bytes: int = 0) -> Transformer:
    """Load a Mixtral checkpoint (Hugging Face or Mistral layout, or mixtral's int8/int4) into a
    model in eval mode. Calling the model on a [B, T] LongTensor of token ids returns fp32
    logits [B, T, vocab]. With `max_ram` (e.g. "16GiB"; quantized checkpoints, CPU) the
    experts stay on disk and are paged in on demand under that budget, which must also hold
    the caller's KV cache (`kv_cache_bytes`). The model runs the reference modules of
    model.py; mixtral.assemble adds the fast paths, LoRA, quantization and sharding."""
    from mixtral.assemble import assemble

    return assemble(path, dtype=dtype, device=device, max_ram=max_ram,
                    kv_cache_bytes=kv_cache_bytes, fast=False)


def __getattr__(name: str) -> Any:
    # `mixtral.chat.encode(...)` works after a bare `import mixtral`; submodules load on first use
    if name in {"chat", "checkpoint", "config", "formats", "generate", "model", "sampling",
                "tokenizer", "completion", "cache"}:
        return importlib.import_module(f"mixtral.{name}")
    raise AttributeError(f"module 'mixtral' has no attribute {name!r}")
