"""mixtral.quant.describe: a loaded model's facts read off its modules (the model card's source):
float, int8 and int4, on PyTorch's kernels and after mixtral.fast moved them onto ours, and
with its experts offloaded."""

from __future__ import annotations

import pytest
import torch
from conftest import tiers_up_to_machine

from mixtral import kernels
from mixtral.config import param_counts
from mixtral.default_model import random_tiny
from mixtral.fast import optimize
from mixtral.quant import default_group_size, describe, get, quantize_model, quantize_weight


def facts(model, quantization=None, offload=None) -> dict:
    counts = param_counts(model.args)
    return {"parameters": counts["total"], "active_parameters": counts["active"],
            "dtype": "bfloat16", "quantization": quantization, "offload": offload}


@pytest.mark.parametrize("isa", tiers_up_to_machine(), indirect=True)
def test_a_float_model_is_its_counts_and_dtype(isa):
    """The weights' dtype at every tier, also where a bf16 model computes in fp32 (below
    AVX-512: mixtral.fast widens its embeddings and norms)."""
    model = random_tiny(torch.bfloat16)
    assert describe(model) == facts(model)
    assert describe(optimize(model)) == facts(model)  # fast float modules are not quantized


@pytest.mark.parametrize("isa", tiers_up_to_machine(), indirect=True)
@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_names_format_group_and_kernels(bits, fast, isa):
    model = random_tiny(torch.bfloat16)
    quantize_model(model, bits)
    group = default_group_size(model.args) if bits == 4 else None
    label = "int8" if bits == 8 else f"int4, groups of {group}"
    # the tiny model's sizes suit our kernels, so optimize moves every projection onto them
    ours = fast and kernels.available()
    if fast:
        optimize(model)
    assert describe(model) == facts(model, {"format": label, "bits": bits, "group_size": group,
                                            "kernels": ["mixtral" if ours else "pytorch"],
                                            "formats": [label]})


def test_mixed_formats_are_all_listed():
    """A GGUF file can keep layers in different types: the first module's is the format."""
    model = random_tiny(torch.bfloat16)
    quantize_model(model, 4, 32)
    attention = model.get_submodule("layers.1.attention")
    q, s = quantize_weight(torch.randn(attention.wo.out_features, attention.wo.in_features), 8, 0)
    attention.wo = get(8).linear(q, s, 0, torch.bfloat16)
    got = describe(model)["quantization"]
    assert got["format"] == "int4, groups of 32" and got["bits"] == 4
    assert got["formats"] == ["int4, groups of 32", "int8"]


def test_offloaded_experts_give_their_budget_and_policy(tmp_path):
    from mixtral.checkpoint import quantize_checkpoint, save
    from mixtral.offload import load_offloaded

    model = random_tiny()
    save(model.state_dict(), model.args, tmp_path / "float")
    quantize_checkpoint(tmp_path / "float", tmp_path / "q4", 4)
    for policy, prefetch in (("lru", False), ("aging", True)):
        loaded = load_offloaded(tmp_path / "q4", "2GiB", policy=policy, prefetch=prefetch)
        got = describe(loaded)
        assert got["offload"] == {"experts_budget_bytes": loaded.expert_cache.budget,
                                  "policy": policy, "prefetch": prefetch}
        assert 0 < got["offload"]["experts_budget_bytes"] < 2 * 2**30
        assert got["quantization"]["format"] == f"int4, groups of {default_group_size(model.args)}"
