"""The model every command runs when no --model is given, so that everything works offline.

The project ships a small Mixtral trained by its own pipeline (scripts/train_default.sh) in
`mixtral/data/default/` (see its MODEL_CARD.md). Where that folder holds no weights (a build of
the package without them), the default is the `tiny` preset with seeded random weights: it
exercises the whole system, its text is noise, and every command using it says so.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mixtral.checkpoint import inspect, load
from mixtral.config import param_counts, preset
from mixtral.model import Transformer

SHIPPED = Path(__file__).parent / "data" / "default"
HAS_SHIPPED = (SHIPPED / "model.safetensors").exists()
NAME = "mixtral-default" if HAS_SHIPPED else "mixtral-tiny-random"


def label() -> str:
    """What a command using the default says of it (the shipped model's size from its config:
    the card and the weights change together, this line with them)."""
    if not HAS_SHIPPED:
        return (f"{NAME}: the built-in default is a tiny Mixtral with RANDOM weights (no trained "
                "default model ships in this build), so its output is noise; pass --model PATH "
                "for real weights")
    total = param_counts(inspect(SHIPPED).args)["total"]
    return (f"{NAME}: the built-in default, a {total / 1e6:.1f}M-parameter Mixtral trained on 2 "
            f"CPU cores by this project's pipeline (see {SHIPPED / 'MODEL_CARD.md'}): a demo of "
            "the system, not an assistant; pass --model PATH for real weights")


DESCRIPTION = ("small demo Mixtral trained by this project (see MODEL_CARD.md)" if HAS_SHIPPED
               else "tiny Mixtral with RANDOM weights (no trained default in this build): "
               "output is noise")


def load_default(dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu") -> Transformer:
    if HAS_SHIPPED:
        return load(SHIPPED, dtype, device)
    return random_tiny(dtype, device)


def random_tiny(dtype: torch.dtype | None = None,
                device: torch.device | str = "cpu") -> Transformer:
    """The `tiny` preset with seeded random weights (tests use it: fast and always the same)."""
    model = Transformer(preset("tiny"))
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    return model.to(device=device, dtype=dtype).eval()
