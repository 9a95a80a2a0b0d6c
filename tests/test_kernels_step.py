"""A decoding step's few large ops (issue 12: the per-step overhead): RMSNorm as one op, the
MoE routed inside its op, and the products and attention taking tensors in the shapes the
model holds them. Each is held to bit-for-bit equality with what it replaced, on every x86
tier of kernels this CPU can run, and so is a whole model's decoding (benchmarks/
step_overhead.py counts what was cut)."""

from __future__ import annotations

import pytest
import torch
from test_kernels import KERNEL_TIERS, tier  # noqa: F401  (the tier fixture)

from mixtral import fast, kernels
from mixtral.cache import KVCache
from mixtral.fast import FastRMSNorm, FusedExperts, fuse_experts, optimize
from mixtral.model import RMSNorm, Transformer, route
from mixtral.quant import QuantExperts, get, quantize_model, quantize_weight
from tests.test_fast import ARGS

pytestmark = pytest.mark.skipif(not kernels.available(), reason=str(kernels.unavailable_reason()))
assert KERNEL_TIERS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [1, 7, 64, 100, 1024, 4100])
def test_rms_norm_is_the_reference_bit_for_bit(tier, dtype, D):  # noqa: F811
    g = torch.Generator().manual_seed(D)
    norm = RMSNorm(D, 1e-5)
    norm.weight.data = torch.randn(D, generator=g)
    norm = norm.to(dtype)
    for shape in [(1, 1, D), (3, 1, D), (5, D)]:
        x = (torch.randn(*shape, generator=g) * 3).to(dtype)
        with torch.no_grad():
            want = norm(x)
        got = kernels.rms_norm(x, norm.weight.detach(), norm.eps)
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got, want)
    t = torch.randn(4, D, generator=g).to(dtype)[:, None]  # a strided view
    with torch.no_grad():
        assert torch.equal(kernels.rms_norm(t.transpose(0, 1), norm.weight.detach(), 1e-5),
                           norm(t.transpose(0, 1)))


def test_rms_norm_names_bad_input(tier):  # noqa: F811
    with pytest.raises(RuntimeError, match=r"rms_norm: need x \[..., D\] and weight \[D\]"):
        kernels.rms_norm(torch.zeros(2, 8), torch.ones(4), 1e-5)
    with pytest.raises(RuntimeError, match="rms_norm: x and weight must both be fp32 or both"):
        kernels.rms_norm(torch.zeros(2, 8), torch.ones(8).bfloat16(), 1e-5)


def test_fast_norm_falls_back_where_a_gradient_is_wanted(tier):  # noqa: F811
    norm = fast.fast_norm(RMSNorm(16, 1e-5))
    assert isinstance(norm, FastRMSNorm)
    x = torch.randn(2, 16, requires_grad=True)
    norm(x).sum().backward()  # the reference's operations: a gradient flows
    assert x.grad is not None and norm.weight.grad is not None


@pytest.mark.parametrize("qx", [False, True])
def test_products_take_a_steps_shape(tier, qx):  # noqa: F811
    """x [B, 1, K] -> [B, 1, N], equal to the product on x [B, K]."""
    g = torch.Generator().manual_seed(7)
    K, N = 256, 48
    x = torch.randn(3, 1, K, generator=g)
    w8, s8 = get(8).quantize(torch.randn(N, K, generator=g), 0)
    w4 = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g)
    sz = torch.rand(N, K // 64, 2, generator=g)
    wb = torch.randn(N, K, generator=g).bfloat16()
    for dtype in (torch.float32, torch.bfloat16):
        xs = x.to(dtype)
        for product in (lambda t: kernels.int8_mv(t, w8, s8, qx),
                        lambda t: kernels.int4_mv(t, w4, sz, 64, qx),
                        lambda t: kernels.bf16_mv(t, wb)):
            got = product(xs)
            assert got.shape == (3, 1, N)
            assert torch.equal(got, product(xs.reshape(3, K)).view(3, 1, N))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3])
def test_moe_route_is_route_then_moe_decode(tier, bits, dtype, M):  # noqa: F811
    g = torch.Generator().manual_seed(bits * 10 + M)
    E, D, Fh = 8, 128, 192
    banks = {name: quantize_weight(torch.randn(E, *shape, generator=g) * 0.1, bits, 64)
             for name, shape in (("w1", (Fh, D)), ("w2", (D, Fh)), ("w3", (Fh, D)))}
    experts = fuse_experts(QuantExperts(banks, get(bits), 64, dtype))
    assert isinstance(experts, FusedExperts) and experts.banks is not None
    x = torch.randn(M, 1, D, generator=g).to(dtype)
    logits = torch.randn(M, 1, E, generator=g).to(dtype)
    weights, chosen = route(logits.view(M, E), 2, dtype)
    want = experts.decode(x.view(M, D), chosen, weights).view(M, 1, D)
    assert torch.equal(experts.route(x, logits, 2), want)
    with pytest.raises(RuntimeError, match="moe_route: need x"):
        experts.route(x, logits[:, :, :4], 2)


def test_decode_attention_takes_a_steps_shape(tier):  # noqa: F811
    from mixtral.model import rope_cos_sin

    g = torch.Generator().manual_seed(3)
    H, K, A, R, S = 8, 2, 16, 3, 24
    rows, positions = torch.tensor([2, 0]), torch.tensor([[5], [11]])
    cos, sin = rope_cos_sin(positions, A, 1e6)  # [B, 1, A/2]
    qkv = torch.randn(2, 1, (H + 2 * K) * A, generator=g)
    stores = [torch.randn(R, K, S, A, generator=g) for _ in range(2)]
    theirs = [t.clone() for t in stores]
    got = kernels.decode_attention(qkv, cos, sin, *stores, rows, positions, None, 12, H, K)
    want = kernels.decode_attention(qkv.view(2, -1), cos.view(2, -1), sin.view(2, -1), *theirs,
                                    rows, positions.view(2), None, 12, H, K)
    assert got.shape == (2, 1, H * A) and torch.equal(got, want.view(2, 1, H * A))
    assert all(torch.equal(a, b) for a, b in zip(stores, theirs, strict=True))


def _before(monkeypatch) -> None:
    """The fast paths as they were before the step's ops were merged: the reference norm, the
    projections through their modules, routing in Python then moe_decode."""
    monkeypatch.setattr(FastRMSNorm, "forward", RMSNorm.forward)
    monkeypatch.setattr(fast, "project", lambda m, x: m(x))

    def routed(self, x, logits, top_k):
        weights, chosen = route(logits.reshape(-1, logits.shape[-1]), top_k, x.dtype)
        return self.decode(x.reshape(-1, x.shape[-1]), chosen, weights).view(x.shape)

    monkeypatch.setattr(FusedExperts, "route", routed)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_models_decoding_is_unchanged_bit_for_bit(tier, bits, monkeypatch):  # noqa: F811
    """Prefill, then decoding steps of one row and of two, through the optimized quantized
    model: the same logits as the unmerged paths, every tier's own activations (int8 on
    AVX2)."""
    torch.manual_seed(0)
    model = Transformer(ARGS)
    model.init_weights(std=0.1)
    model = optimize(quantize_model(model.to(torch.bfloat16).eval(), bits))
    assert isinstance(model.norm, FastRMSNorm)

    def run() -> list[torch.Tensor]:
        out = []
        tokens = torch.randint(0, ARGS.vocab_size, (2, 14), generator=torch.Generator()
                               .manual_seed(1))
        with torch.inference_mode():
            for B in (1, 2):
                cache = KVCache(ARGS, B, 32, model.dtype)
                model(tokens[:B, :10], torch.arange(10).expand(B, 10), cache)
                for p in range(10, 14):
                    out.append(model(tokens[:B, p:p + 1], torch.full((B, 1), p), cache))
        return out

    now = run()
    with monkeypatch.context() as m:
        _before(m)
        then = run()
    assert all(torch.equal(a, b) for a, b in zip(now, then, strict=True))
