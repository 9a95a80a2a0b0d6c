"""Our CPU kernels (mixtral.kernels) against plain PyTorch in fp64, and their use by the fast
modules: whole tensors, every row count the decode and prefill paths take, on every x86 tier
of kernels this CPU can run (each tier's build is held to the same standards)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiers_up_to_machine

from mixtral import cpu, kernels
from mixtral.fast import optimize
from mixtral.model import Transformer
from mixtral.projections import Int4Rows, Int8Rows
from mixtral.quant import Int4Linear, Int8Linear
from mixtral.quant.int4 import dequantize as int4_dequantize
from mixtral.quant.int4 import quantize as int4_quantize
from mixtral.quant.int4 import unpack as int4_unpack
from mixtral.quant.int8 import quantize as int8_quantize
from tests.test_fast import ARGS

pytestmark = pytest.mark.skipif(not kernels.available(), reason=str(kernels.unavailable_reason()))

# every tier with kernels; those above this process's (its CPU's, or a MIXTRAL_ISA set before
# it started, which capped PyTorch and oneDNN too) are skipped, naming the tier
KERNEL_TIERS = tiers_up_to_machine("avx2")
assert [p.values[0] for p in KERNEL_TIERS] == list(kernels.FLAGS)
RUNNABLE = [p.values[0] for p in KERNEL_TIERS if not p.marks]


def _clear() -> None:
    cpu.probe.cache_clear()
    kernels.available.cache_clear()


@pytest.fixture(params=KERNEL_TIERS)
def tier(request, monkeypatch):
    """Runs the test as on a CPU of this tier (MIXTRAL_ISA caps the probe; the kernels follow:
    kernels.* call this tier's build)."""
    t = request.param
    monkeypatch.setenv("MIXTRAL_ISA", t)
    _clear()
    try:
        assert cpu.probe().tier == t and kernels.available()
        assert kernels._here() is kernels.ops(t) is getattr(torch.ops, f"mixtral_{t}")
        yield t
    finally:
        monkeypatch.undo()
        _clear()


def int4_reference(w: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """Our int4 form (the portable bytes, our sz) dequantized in plain PyTorch, fp32 (what
    the kernels are held to)."""
    q = int4_unpack(w).float()
    N, K = q.shape
    g = q.view(N, K // group, group) * sz[..., :1] + sz[..., 1:]  # [N, K/g, g]
    return g.reshape(N, K)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("M", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("K", [16, 48, 1024, 8256])  # rows of x past 16 KB: weight rows 8 at a time
def test_int8_mv_equals_float_product(tier, M, K):
    g = torch.Generator().manual_seed(M * 1000 + K)
    w = torch.randint(-127, 128, (37, K), dtype=torch.int8, generator=g)
    scales = torch.rand(37, generator=g) + 0.1
    x = torch.randn(M, K, generator=g)
    want = x.double() @ (w.double() * scales.double()[:, None]).T
    assert rel_err(kernels.int8_mv(x, w, scales), want) < 1e-6
    xb = x.bfloat16()
    got = kernels.int8_mv(xb, w, scales)
    assert got.dtype == torch.bfloat16
    want_b = (xb.double() @ (w.double() * scales.double()[:, None]).T).to(torch.bfloat16)
    torch.testing.assert_close(got, want_b, atol=0, rtol=2**-7)  # one bf16 rounding


@pytest.mark.parametrize("M", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("K,group", [(64, 64), (256, 64), (1024, 128), (512, 256), (16512, 128)])
def test_int4_mv_equals_float_product(tier, M, K, group):
    g = torch.Generator().manual_seed(M * 1000 + K)
    w = torch.randn(52, K, generator=g)
    ours, sz = int4_quantize(w, group)  # the portable form: the kernels read its bytes
    ours_sz = kernels.int4_offsets(*sz.transpose(0, 1).unbind(-1))
    dense = int4_reference(ours, ours_sz, group)
    torch.testing.assert_close(dense, int4_dequantize(ours, sz, group), atol=1e-6, rtol=1e-6)
    x = torch.randn(M, K, generator=g)
    assert rel_err(kernels.int4_mv(x, ours, ours_sz, group), x.double() @ dense.double().T) < 1e-5
    xb = x.bfloat16()  # the bf16 path (dot products of bf16 pairs where the CPU has them)
    got = kernels.int4_mv(xb, ours, ours_sz, group)
    assert got.dtype == torch.bfloat16
    want = xb.double() @ dense.double().T
    torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(),
                               rtol=2**-8)  # one bf16 rounding


def nibble_order(x: torch.Tensor) -> torch.Tensor:
    """[..., K] in the order int4 kernels take x (csrc/lowbit.cpp): in each 64 columns, the 32
    odd ones, then the 32 even ones (a byte's low nibble, then its high one)."""
    *lead, K = x.shape
    return x.reshape(*lead, K // 64, 32, 2).flip(-1).transpose(-1, -2).reshape(*lead, K)


def q8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] quantized as csrc/q8.cpp does, in plain PyTorch: blocks of 32 columns, d =
    max|x| / 127 in fp32, q = round(x * (1 / d)) with ties to even -> (q [M, K/32, 32] fp64,
    d [M, K/32] fp64)."""
    M, K = x.shape
    xb = x.float().view(M, K // 32, 32)
    d = xb.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return torch.round(xb * inv[..., None]).double(), d.double()


@pytest.mark.parametrize("M", [1, 2, 3, 5, 16, 37])  # past 16 rows: x in chunks (a prompt)
@pytest.mark.parametrize("K", [32, 96, 4096, 16416])  # past 16 KB of x: weight rows 8 at a time
def test_int8_mv_on_int8_activations(tier, M, K):
    """qx: x quantized to int8 per 32 columns, integer dot products. Equal (to fp32 rounding)
    to the same arithmetic in fp64, and within its stated bound of the exact product."""
    g = torch.Generator().manual_seed(M * 1000 + K)
    w = torch.randint(-128, 128, (37, K), dtype=torch.int8, generator=g)  # -128 too
    scales = torch.rand(37, generator=g) + 0.1
    x = torch.randn(M, K, generator=g)
    if K > 32:
        x[0, 32:64] = 0  # a block of zeros (d = 0)
    q, d = q8_reference(x)
    blocks = torch.einsum("mbk,nbk->mnb", q, w.double().view(37, K // 32, 32))
    want = (blocks * d[:, None, :]).sum(-1) * scales.double()
    for xin in (x, x.bfloat16()):
        got = kernels.int8_mv(xin, w, scales, qx=True)
        assert got.dtype == xin.dtype and got.shape == (M, 37)
        if xin.dtype == torch.float32:
            assert rel_err(got, want) < 1e-6
    exact = x.double() @ (w.double() * scales.double()[:, None]).T
    assert rel_err(kernels.int8_mv(x, w, scales, qx=True), exact) < 2e-2
    # K not a multiple of 32: the float path
    x16, w16 = x[:, :16].contiguous(), w[:, :16].contiguous()
    assert rel_err(kernels.int8_mv(x16, w16, scales, qx=True),
                   x16.double() @ (w16.double() * scales.double()[:, None]).T) < 1e-6


@pytest.mark.parametrize("M", [1, 2, 5, 16, 37])  # 37 rows of 16512 columns: three chunks
@pytest.mark.parametrize("K,group", [(64, 64), (1024, 128), (512, 256), (16512, 128)])
def test_int4_mv_on_int8_activations(tier, M, K, group):
    """The same for int4 weights: sum over groups of scale * sum_b d_b * (q . nibbles) plus
    offset * (the exact x summed over the group), x's blocks of 32 taken in the nibbles' order
    (the odd or the even columns of 64)."""
    g = torch.Generator().manual_seed(M * 1000 + K)
    N = 52
    ours, sz = int4_quantize(torch.randn(N, K, generator=g), group)
    q4 = nibble_order(int4_unpack(ours))
    ours_sz = kernels.int4_offsets(*sz.transpose(0, 1).unbind(-1))
    x = torch.randn(M, K, generator=g)
    q, d = q8_reference(nibble_order(x))
    blocks = torch.einsum("mbk,nbk->mnb", q, q4.double().view(N, K // 32, 32)) * d[:, None, :]
    per_group = blocks.view(M, N, K // group, group // 32).sum(-1)  # [M, N, K/g]
    x_sums = x.double().view(M, K // group, group).sum(-1)  # [M, K/g]
    s, o = ours_sz.double().unbind(-1)  # [N, K/g] each
    want = (per_group * s).sum(-1) + (x_sums[:, None, :] * o).sum(-1)
    assert rel_err(kernels.int4_mv(x, ours, ours_sz, group, qx=True), want) < 1e-5
    got = kernels.int4_mv(x.bfloat16(), ours, ours_sz, group, qx=True)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    exact = x.double() @ int4_reference(ours, ours_sz, group).double().T
    assert rel_err(kernels.int4_mv(x, ours, ours_sz, group, qx=True), exact) < 3e-2


@pytest.mark.parametrize("M", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("K", [16, 40, 1024, 1030, 8200])  # whole blocks of pairs, and a tail
def test_bf16_mv_equals_float_product(tier, M, K):
    g = torch.Generator().manual_seed(M * 1000 + K)
    w = torch.randn(37, K, generator=g).bfloat16()
    x = torch.randn(M, K, generator=g)
    want = x.double() @ w.double().T
    got = kernels.bf16_mv(x, w)
    assert got.dtype == torch.float32 and got.shape == (M, 37)
    assert rel_err(got, want) < 1e-6
    xb = x.bfloat16()
    got = kernels.bf16_mv(xb, w)
    assert got.dtype == torch.bfloat16
    want_b = (xb.double() @ w.double().T).to(torch.bfloat16)
    torch.testing.assert_close(got, want_b, atol=0, rtol=2**-7)  # one bf16 rounding
    assert torch.equal(kernels.bf16_mv(x[:, :0], w[:, :0]), torch.zeros(M, 37))


def test_bf16_mv_names_bad_input(tier):
    with pytest.raises(RuntimeError, match=r"bf16_mv: w must be contiguous bf16 \[N, K\]"):
        kernels.bf16_mv(torch.zeros(1, 32), torch.zeros(8, 32))
    with pytest.raises(RuntimeError, match=r"bf16_mv: x must be \[M, 32\]"):
        kernels.bf16_mv(torch.zeros(1, 16), torch.zeros(8, 32, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int4_scales_equal_the_modules_rounded_offsets(tier, dtype):
    """The file's scales_and_zeros -> our sz in one pass equals what Int4Linear holds (rounded
    to its dtype), transposed, as int4_offsets: offloaded experts equal resident ones. Values
    across many binades, leading dims, a row count across the parallel grain; bad input named."""
    g = torch.Generator().manual_seed(7)
    for shape in [(3, 40, 2), (2, 5, 1031, 2)]:
        sz = torch.randn(*shape, generator=g) * torch.logspace(-9, 4, shape[-2])[:, None]
        rounded = sz.to(dtype)
        want = kernels.int4_offsets(*rounded.transpose(-3, -2).unbind(-1))
        assert torch.equal(kernels.int4_scales(sz, dtype), want)
        assert torch.equal(kernels.int4_scales(rounded, dtype), want)  # idempotent
        mine = sz.clone()
        got = kernels.int4_scales_(mine, dtype)  # in place: a view of the same storage
        assert torch.equal(got, want) and got.data_ptr() == mine.data_ptr()
    with pytest.raises(RuntimeError, match=r"scales_and_zeros \[..., K/g, N, 2\]"):
        kernels.int4_scales(torch.zeros(4, 3), dtype)
    with pytest.raises(RuntimeError, match="dtype must be"):
        kernels.int4_scales(torch.zeros(1, 4, 2), torch.float64)
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        kernels.int4_scales_(torch.zeros(2, 4, 2).transpose(0, 1), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_equals_reference(tier, dtype):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 256, generator=g)
    q8, s8 = int8_quantize(w)
    want8 = (q8.float() * s8[:, None]).to(dtype)
    assert torch.equal(kernels.int8_dequantize(q8, s8, dtype), want8)
    ours, sz = int4_quantize(w, 64)
    ours_sz = kernels.int4_offsets(*sz.transpose(0, 1).unbind(-1))
    want4 = int4_reference(ours, ours_sz, 64).to(dtype)
    torch.testing.assert_close(kernels.int4_dequantize(ours, ours_sz, 64, dtype), want4,
                               atol=1e-6, rtol=0)


def test_kernels_name_bad_input(tier):
    w = torch.zeros(8, 32, dtype=torch.int8)
    with pytest.raises(RuntimeError, match=r"int8_mv: x must be \[M, 32\]"):
        kernels.int8_mv(torch.zeros(1, 16), w, torch.ones(8))
    with pytest.raises(RuntimeError, match="int8_mv: scales must be"):
        kernels.int8_mv(torch.zeros(1, 32), w, torch.ones(7))
    with pytest.raises(RuntimeError, match="int4_mv: need group % 64 == 0"):
        kernels.int4_mv(torch.zeros(1, 64), torch.zeros(8, 32, dtype=torch.uint8),
                        torch.zeros(8, 3, 2), 20)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activations", ["float", "int8"])
def test_fast_quantized_modules_use_the_kernels(tier, bits, dtype, activations, monkeypatch):
    """optimize() moves int8/int4 projections onto the kernels (fused like the float ones),
    and the model gives the reference quantized model's logits: single rows on the
    matrix-vector kernels, a 40-token prompt also on dequantize + GEMM. bf16 rounds at other
    points, and a near-tie then routes a token elsewhere: as in test_fast, the fast model must
    be as close to the fp32 quantized model as the reference is, in the median. With int8
    activations (AVX2's default, prompts included) the rounding of x adds its own: up to 6e-2
    more median relative error in this small random model's logits (measured in fp32: int8
    2.1e-2, int4 4.7e-2; on the shipped model's text that is KL +0.0013 nats, RESULTS.md)."""
    from mixtral.quant import quantize_model

    monkeypatch.setenv("MIXTRAL_ACTIVATIONS", activations)
    cpu.probe.cache_clear()

    torch.manual_seed(0)
    base = Transformer(ARGS.with_(dim=128, head_dim=32, hidden_dim=192, vocab_size=320))
    base.init_weights(std=0.1)

    def quantized(float_dtype: torch.dtype) -> Transformer:
        model = Transformer(base.args)
        model.load_state_dict(base.state_dict())
        return quantize_model(model.to(float_dtype).eval(), bits)

    ref, fast, exact = quantized(dtype), optimize(quantized(dtype)), quantized(torch.float32)
    kind = Int8Rows if bits == 8 else Int4Rows
    assert isinstance(fast.layers[0].attention.wqkv, kind)
    assert isinstance(fast.layers[0].feed_forward.experts.w13[0], kind)
    assert isinstance(fast.output, kind)
    assert isinstance(ref.output, Int8Linear if bits == 8 else Int4Linear)
    tokens = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    errors: dict[str, list[torch.Tensor]] = {"ref": [], "fast": []}
    with torch.no_grad():
        for t in (1, 2, 3, 40):
            want, got = ref(tokens[:, :t]), fast(tokens[:, :t])
            if dtype == torch.float32 and activations == "float":
                torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(),
                                           rtol=0)
            e = exact(tokens[:, :t])
            for name, out in (("ref", want), ("fast", got)):
                errors[name].append(((out - e).norm(dim=-1) / e.norm(dim=-1)).flatten())
    fast_err, ref_err = (torch.cat(errors[k]).median() for k in ("fast", "ref"))
    if activations == "float":
        assert fast_err <= 1.5 * ref_err + 1e-5, (fast_err, ref_err)
    else:
        assert fast_err <= 1.5 * ref_err + 6e-2, (fast_err, ref_err)
        if dtype == torch.float32:  # the activations were quantized: the test sees the path
            assert fast_err > 1e-4, fast_err


def test_without_kernels_the_quantized_modules_stay(monkeypatch):
    from mixtral.quant import quantize_model

    monkeypatch.setenv("MIXTRAL_KERNELS", "0")
    kernels.available.cache_clear()
    try:
        assert not kernels.available()
        torch.manual_seed(0)
        model = Transformer(ARGS)
        model.init_weights(std=0.1)
        model = optimize(quantize_model(model.eval(), 8))
        assert isinstance(model.output, Int8Linear)
        assert isinstance(model.layers[0].attention.wq, Int8Linear)
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()
    finally:
        monkeypatch.delenv("MIXTRAL_KERNELS")
        kernels.available.cache_clear()


def _reference_step(qkv, cos, sin, k_store, v_store, rows, positions, mask, span, H, K):
    """decode_attention in PyTorch: the fast path's own operations (fast._rope,
    fast._one_query_attention) and an explicit cache write."""
    from mixtral.fast import _one_query_attention, _rope

    B, A = qkv.shape[0], k_store.shape[-1]
    q, k, v = qkv.view(B, 1, H + 2 * K, A).split([H, K, K], dim=2)
    rot = torch.complex(cos, sin).view(B, 1, 1, A // 2)
    q, k, v = _rope(q, rot).transpose(1, 2), _rope(k, rot).transpose(1, 2), v.transpose(1, 2)
    for b in range(B):
        k_store[rows[b], :, positions[b]] = k[b, :, 0]
        v_store[rows[b], :, positions[b]] = v[b, :, 0]
    keys, values = k_store[rows, :, :span], v_store[rows, :, :span]
    m = None if mask is None else mask.view(B, 1, 1, span)
    return _one_query_attention(q, keys, values, m).reshape(B, H * A)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("A", [16, 24, 64])
@pytest.mark.parametrize("case", ["one row", "scattered rows", "window"])
def test_decode_attention_equals_pytorch(tier, dtype, A, case):
    from mixtral.model import attention_mask, rope_cos_sin

    g = torch.Generator().manual_seed(A)
    H, K, R, S = 8, 2, 4, 40
    rows = torch.tensor([0]) if case == "one row" else torch.tensor([2, 0, 3])
    positions = torch.tensor([17]) if case == "one row" else torch.tensor([5, 17, 11])
    B = len(rows)
    span = int(positions.max()) + 1
    mask = None
    if case != "one row":
        window = 6 if case == "window" else None
        mask = attention_mask(positions[:, None], torch.arange(span), window).reshape(B, span)
    stores = [torch.randn(R, K, S, A, generator=g).to(dtype) for _ in range(2)]
    theirs = [t.clone() for t in stores]
    qkv = torch.randn(B, (H + 2 * K) * A, generator=g).to(dtype)
    cos, sin = (t.reshape(B, A // 2) for t in rope_cos_sin(positions[:, None], A, 1e6))
    got = kernels.decode_attention(qkv, cos, sin, *stores, rows, positions, mask, span, H, K)
    want = _reference_step(qkv, cos, sin, *theirs, rows, positions, mask, span, H, K)
    assert got.dtype == dtype
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(stores[0], theirs[0], **tol)  # the rotated keys written
    assert torch.equal(stores[1], theirs[1])  # values are copied as they are


def test_decode_attention_names_bad_input(tier):
    stores = [torch.zeros(2, 2, 8, 16) for _ in range(2)]
    qkv = torch.zeros(1, (8 + 4) * 16)
    cs = torch.zeros(1, 8)
    with pytest.raises(RuntimeError, match="position 9; need row < 2 and position < span 5"):
        kernels.decode_attention(qkv, cs, cs, *stores, torch.tensor([0]), torch.tensor([9]),
                                 None, 5, 8, 2)
    with pytest.raises(RuntimeError, match=r"qkv must be contiguous \[B, 192\]"):
        kernels.decode_attention(qkv[:, :100], cs, cs, *stores, torch.tensor([0]),
                                 torch.tensor([1]), None, 5, 8, 2)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3])
def test_moe_decode_equals_the_python_path(tier, bits, dtype, M):
    """The one-call MoE of a decoding step gives the per-expert Python loop's tensor exactly:
    the same operations in the same dtype and order."""
    from mixtral.fast import FusedExperts, fuse_experts
    from mixtral.quant import QuantExperts, get, quantize_weight

    g = torch.Generator().manual_seed(bits * 10 + M)
    E, D, Fh = 8, 128, 192
    banks = {name: quantize_weight(torch.randn(E, *shape, generator=g) * 0.1, bits, 64)
             for name, shape in (("w1", (Fh, D)), ("w2", (D, Fh)), ("w3", (Fh, D)))}
    experts = fuse_experts(QuantExperts(banks, get(bits), 64, dtype))
    assert isinstance(experts, FusedExperts) and experts.banks is not None
    x = torch.randn(M, D, generator=g).to(dtype)
    chosen = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(M)])
    weights = torch.softmax(torch.randn(M, 2, generator=g), dim=-1).to(dtype)
    want = []
    for n in range(M):
        terms = [experts.expert(e, x[n:n + 1]) * w
                 for e, w in sorted(zip(chosen[n].tolist(), weights[n].tolist(), strict=True))]
        want.append(terms[0] + terms[1])
    assert torch.equal(experts.decode(x, chosen, weights), torch.cat(want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3])
def test_moe_decode_on_bf16_banks_equals_the_python_loop(tier, dtype, M):
    """bits=16: bf16 banks w13 [E, 2F, D] and w2 [E, D, F] on bf16_mv (no scales), exactly the
    per-expert loop of the same operations."""
    g = torch.Generator().manual_seed(16 + M)
    E, D, Fh = 8, 128, 192
    w13 = (torch.randn(E, 2 * Fh, D, generator=g) * 0.1).bfloat16()
    w2 = (torch.randn(E, D, Fh, generator=g) * 0.1).bfloat16()
    x = torch.randn(M, D, generator=g).to(dtype)
    chosen = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(M)])
    weights = torch.softmax(torch.randn(M, 2, generator=g), dim=-1).to(dtype)
    want = []
    for n in range(M):
        terms = []
        for e, wt in sorted(zip(chosen[n].tolist(), weights[n].tolist(), strict=True)):
            h = kernels.bf16_mv(x[n:n + 1], w13[e])
            terms.append(kernels.bf16_mv(F.silu(h[:, :Fh]) * h[:, Fh:], w2[e]) * wt)
        want.append(terms[0] + terms[1])
    none = torch.empty(0)
    got = kernels.moe_decode(x, chosen, weights, w13, none, w2, none, 16, 0)
    assert torch.equal(got, torch.cat(want))


def test_generic_cpus_use_pytorch_quietly(monkeypatch, recwarn):
    """A CPU without AVX2 (or ARM): no build attempted, no warning, PyTorch's kernels."""
    from torch.utils import cpp_extension

    def no_build(**_kwargs):
        raise AssertionError("a build was attempted")

    monkeypatch.setenv("MIXTRAL_ISA", "generic")
    monkeypatch.setattr(cpp_extension, "load", no_build)
    _clear()
    try:
        assert not kernels.available()
        assert kernels.why_not() == "no build for the generic tier"
        assert not [w for w in recwarn if "mixtral" in str(w.message)]
        with pytest.raises(ValueError, match="no kernels for the generic tier"):
            kernels.ops("generic")
    finally:
        monkeypatch.undo()
        _clear()
    assert kernels.available()


def test_two_tiers_load_in_one_process_and_agree():
    """Each tier's build has its own op namespace, so several load side by side; they compute
    the same products (to fp32 rounding: their sums run in different orders)."""
    tiers = RUNNABLE
    if len(tiers) < 2:
        pytest.skip(f"this process runs one tier with kernels ({', '.join(tiers)}): "
                    "a CPU or MIXTRAL_ISA at avx512 or above has two")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 256, generator=g)
    w8, s8 = torch.randint(-127, 128, (40, 256), dtype=torch.int8, generator=g), torch.rand(40)
    w4 = torch.randint(0, 256, (40, 128), dtype=torch.uint8, generator=g)
    sz = torch.randn(40, 2, 2, generator=g)
    wb = torch.randn(40, 256, generator=g).bfloat16()
    results = {}
    for t in tiers:
        o = kernels.ops(t)
        results[t] = [o.int8_mv(x, w8, s8), o.int4_mv(x, w4, sz, 128), o.bf16_mv(x, wb),
                      o.int4_mv(x.bfloat16(), w4, sz, 128).float()]
    assert len({id(kernels.ops(t)) for t in tiers}) == len(tiers)
    for t in tiers[1:]:
        for got, want in zip(results[t], results[tiers[0]], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
            # (the bf16 row: one bf16 rounding of nearly equal fp32 sums)


def test_a_killed_builds_lock_is_cleared_at_once(tmp_path):
    """A build killed midway leaves PyTorch's lock file; the next process must neither wait on
    it nor build beside a live builder (whose OS lock another process cannot take)."""
    import subprocess
    import sys

    lock = tmp_path / "lock"
    try_lock = ("import fcntl, sys\n"
                f"f = open({str(tmp_path / 'build.flock')!r}, 'a')\n"
                "try: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                "except BlockingIOError: sys.exit(3)\n")
    lock.touch()  # a dead builder's
    with kernels.build_lock(str(tmp_path)):
        assert not lock.exists()
        assert subprocess.run([sys.executable, "-c", try_lock]).returncode == 3  # held
        lock.touch()  # the file of the build under way
    assert subprocess.run([sys.executable, "-c", try_lock]).returncode == 0  # released
    with kernels.build_lock(str(tmp_path)):  # the next builder clears the dead one's file
        assert not lock.exists()


def test_a_failed_build_says_what_to_do(monkeypatch):
    from torch.utils import cpp_extension

    def fail(**_kwargs):
        raise RuntimeError("Error building extension 'mixtral_kernels': c++: not found\n...")

    monkeypatch.setattr(cpp_extension, "load", fail)
    kernels.available.cache_clear()
    kernels.ops.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"c\+\+: not found.*Install a C\+\+ compiler"):
            assert not kernels.available()
    finally:
        monkeypatch.undo()
        kernels.available.cache_clear()
    assert kernels.available()
