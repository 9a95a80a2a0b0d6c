"""The fast paths (mixtral.fast) against the reference modules of model.py."""

from __future__ import annotations

import pytest
import torch
from conftest import tiers_up_to_machine
from torch import nn

from mixtral import cpu
from mixtral.cache import KVCache
from mixtral.config import ModelArgs
from mixtral.engine import Engine
from mixtral.fast import FastAttention, FastMoe, FusedExperts, optimize
from mixtral.generate import GenerationParams, generate
from mixtral.model import Transformer
from mixtral.projections import Bf16Rows, PackedLinear
from mixtral.quant import quantize_model

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16, hidden_dim=96,
                 num_experts=8, num_experts_per_tok=2, vocab_size=300, max_seq_len=128)


def pair(dtype, **changes):
    torch.manual_seed(0)
    ref = Transformer(ARGS.with_(**changes))
    ref.init_weights(std=0.1)
    ref = ref.to(dtype).eval()
    fast = Transformer(ref.args).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, optimize(fast).eval()


# the module each tier gives a weight of each dtype (mixtral.fast's choice, from mixtral.cpu)
LINEAR = {("generic", torch.float32): nn.Linear, ("generic", torch.bfloat16): nn.Linear,
          ("avx2", torch.float32): PackedLinear, ("avx2", torch.bfloat16): Bf16Rows,
          ("avx512", torch.float32): PackedLinear, ("avx512", torch.bfloat16): PackedLinear,
          ("avx512_bf16", torch.float32): PackedLinear,
          ("avx512_bf16", torch.bfloat16): PackedLinear}


@pytest.mark.parametrize("isa", tiers_up_to_machine(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 6])
def test_fast_equals_reference(dtype, window, isa):
    """fp32: equal up to summation order. bf16: the rounding points differ, and on random
    weights a near-tie then sends a token to another expert, so the test asks that the fast
    path be as close to fp32 as the reference is, position by position, in the median.
    Every tier this machine can be capped to: each picks its own modules."""
    ref, fast = pair(dtype, sliding_window=window)
    assert isinstance(fast.layers[0].attention, FastAttention)
    assert isinstance(fast.layers[0].feed_forward, FastMoe)
    assert type(fast.output) is LINEAR[isa, dtype]
    if LINEAR[isa, dtype] is not nn.Linear:
        assert isinstance(fast.layers[0].feed_forward.experts, FusedExperts)
    # below AVX-512 a bf16 model computes in fp32, its matmul weights staying bf16
    widened = isa == "avx2" and dtype == torch.bfloat16
    assert fast.tok_embeddings.weight.dtype == (torch.float32 if widened else dtype)
    exact = Transformer(ref.args)
    exact.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    models = [ref, fast, exact.eval()]
    tokens = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(1))
    errors: dict[str, list[torch.Tensor]] = {"ref": [], "fast": []}

    def check(outs: list[torch.Tensor]) -> None:
        if dtype == torch.float32:
            torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=2e-5)
        for name, out in zip(("ref", "fast"), outs[:2], strict=True):
            errors[name].append(((out - outs[2]).norm(dim=-1) / outs[2].norm(dim=-1)).flatten())

    with torch.no_grad():
        check([m(tokens) for m in models])  # the prefill path
        caches = [KVCache(ref.args, 3, 32, m.tok_embeddings.weight.dtype) for m in models]
        for m, c in zip(models, caches, strict=True):
            m(tokens[:, :12], torch.arange(12).expand(3, 12), c)
        positions = torch.tensor([[12], [12], [12]])
        for step in range(12, 20):  # decoding: one query, the direct MoE path
            check([m(tokens[:, step:step + 1], positions, c)
                   for m, c in zip(models, caches, strict=True)])
            positions = positions + 1
    fast_err, ref_err = (torch.cat(errors[k]).median() for k in ("fast", "ref"))
    assert fast_err <= 1.5 * ref_err + 1e-6, (fast_err, ref_err)


@pytest.mark.parametrize("isa", tiers_up_to_machine(), indirect=True)
@pytest.mark.parametrize("bits", [8, 4])
def test_fast_paths_over_quantized_modules(bits, isa, monkeypatch):
    """On float activations at every tier (int8 ones, AVX2's default, have their own bound:
    test_kernels.py)."""
    monkeypatch.setenv("MIXTRAL_ACTIVATIONS", "float")
    cpu.probe.cache_clear()
    torch.manual_seed(0)
    ref = Transformer(ARGS)
    ref.init_weights(std=0.1)
    ref = quantize_model(ref.eval(), bits)
    fast = Transformer(ARGS)
    fast.init_weights(std=0.1)
    fast = quantize_model(fast.eval(), bits)
    fast.load_state_dict(ref.state_dict())
    optimize(fast)
    tokens = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(fast(tokens), ref(tokens), atol=1e-4, rtol=1e-4)
    prompt = tokens[0].tolist()
    assert list(generate(fast, prompt, GenerationParams(max_tokens=10))) == \
        list(generate(ref, prompt, GenerationParams(max_tokens=10)))


def test_fast_engine_batches_like_reference_alone():
    """The middle request ends first, so later steps decode cache rows 0 and 2 (scattered)."""
    ref, fast = pair(torch.float32)
    prompts = [[1, 5, 9], list(range(1, 30)), [1, 200, 201, 202]]
    budgets = [12, 3, 12]
    expected = [list(generate(ref, p, GenerationParams(max_tokens=n)))
                for p, n in zip(prompts, budgets, strict=True)]
    engine = Engine(fast, max_batch=3, thread=False)
    got = [[] for _ in prompts]
    for p, n, out in zip(prompts, budgets, got, strict=True):
        engine.submit(p, GenerationParams(max_tokens=n), out.append, lambda e: None)
    engine.run(until_idle=True)
    engine.stop()
    assert got == expected
