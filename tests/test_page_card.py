"""The model card's facts the chat page shows (routes.weights): parameter counts from the config,
the weights' dtype (also where a bf16 model computes in fp32), and the quantization read from
the loaded modules, before and after mixtral.fast swaps them for its kernels' twins."""

from __future__ import annotations

import pytest
import torch
from conftest import tiers_up_to_machine

from mixtral.config import param_counts
from mixtral.default_model import random_tiny
from mixtral.fast import optimize
from mixtral.quant import default_group_size, quantize_model
from mixtral.server.routes import weights


@pytest.mark.parametrize("isa", tiers_up_to_machine(), indirect=True)
@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_card_facts_name_the_quantization(bits, fast, isa):
    model = random_tiny(torch.bfloat16)
    counts = param_counts(model.args)
    if bits:
        quantize_model(model, bits)
    if fast:
        optimize(model)
    expected = {None: None, 8: "int8",
                4: f"int4, groups of {default_group_size(model.args)}"}[bits]
    assert weights(model) == {"parameters": counts["total"], "active_parameters": counts["active"],
                              "dtype": "bfloat16", "quantization": expected}
