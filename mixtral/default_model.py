"""The model every command runs when no --model is given, so that everything works offline.

Until the training pipeline ships trained weights, this is the `tiny` preset with seeded random
weights: it exercises the whole system, but its text is noise, and every user-facing place that
uses it says so (`LABEL`).
"""

from __future__ import annotations

import torch

from mixtral.config import preset
from mixtral.model import Transformer

NAME = "mixtral-tiny-random"
LABEL = (f"{NAME}: the built-in default is a tiny Mixtral with RANDOM weights (no trained "
         "default model ships yet), so its output is noise; pass --model PATH for real weights")


def load_default(dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu") -> Transformer:
    model = Transformer(preset("tiny"))
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    return model.to(device=device, dtype=dtype).eval()
