"""Weight-only int8/int4: the kernels equal their dequantized weights, models stay within stated
bounds of full precision, and quantized checkpoints load back exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import mixtral
from mixtral.checkpoint import CheckpointError, inspect, quantize_checkpoint, save
from mixtral.cli import main
from mixtral.default_model import random_tiny
from mixtral.engine import Engine
from mixtral.generate import GenerationParams, generate
from mixtral.model import Transformer
from mixtral.quantize import (
    Int4Linear,
    Int8Linear,
    QuantExperts,
    int4_dequantize,
    int4_quantize,
    int8_quantize,
    quantize_model,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_equal_the_dequantized_weight(dtype):
    torch.manual_seed(0)
    w, x = torch.randn(96, 256), torch.randn(5, 256).to(dtype)
    q, s = int8_quantize(w)
    assert (q.float() * s[:, None] - w).abs().max() <= s.max() / 2 + 1e-6  # rounding bound
    ref8 = x.float() @ (q.float() * s[:, None]).T
    torch.testing.assert_close(Int8Linear(q, s, dtype)(x).float(), ref8,
                               **({"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32
                                  else {"atol": 0.2, "rtol": 0.02}))
    packed, sz = int4_quantize(w, 64)
    deq = int4_dequantize(packed, sz, 64)
    step = (sz[..., 0].max()).item()
    assert (deq - w).abs().max() <= step / 2 + 1e-5  # each weight within half a step
    ref4 = x.float() @ deq.T
    torch.testing.assert_close(Int4Linear(packed, sz, 64, dtype)(x).float(), ref4,
                               **({"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32
                                  else {"atol": 0.2, "rtol": 0.02}))


def kl(p_logits, q_logits):
    p = torch.log_softmax(p_logits.double(), -1)
    q = torch.log_softmax(q_logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def test_quantized_model_within_bounds():
    """On a random model with weights N(0, 0.05) (logit std 0.4), against fp32: int8 relative L2
    logit error < 0.1 and KL < 1e-3 (measured 0.039, 1.2e-4); int4 < 0.5 and KL < 0.02
    (measured 0.25, 5e-3). Random weights exaggerate errors: every flipped expert choice shows."""
    model = random_tiny()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    tokens = torch.randint(0, 32000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(tokens)
        state = model.state_dict()
        results = {}
        for bits in (8, 4):
            q = Transformer(model.args)
            q.load_state_dict(state)
            quantize_model(q, bits)
            assert isinstance(q.layers[0].feed_forward.experts, QuantExperts)
            out = q(tokens)
            results[bits] = (kl(ref, out), ((out - ref).norm() / ref.norm()).item())
    assert results[8][0] < 1e-3 and results[8][1] < 0.1, results
    assert results[4][0] < 0.02 and results[4][1] < 0.5, results
    assert results[4][1] > results[8][1]  # the test can tell the two apart


def test_quantized_checkpoint_loads_back_exactly(tmp_path):
    model = random_tiny()
    save(model.state_dict(), model.args, tmp_path / "float")
    tokens = torch.randint(0, 32000, (1, 10), generator=torch.Generator().manual_seed(2))
    for bits in (8, 4):
        quantize_checkpoint(tmp_path / "float", tmp_path / f"q{bits}", bits,
                            max_shard_bytes=1_000_000)
        info = inspect(tmp_path / f"q{bits}")
        assert info.quantization == {"bits": bits, "group_size": 64, "layout": "portable"}
        assert len(info.weight_files) > 1  # sharded, with an index
        loaded = mixtral.load(tmp_path / f"q{bits}")
        in_memory = quantize_model(random_tiny(), bits)
        with torch.no_grad():
            torch.testing.assert_close(loaded(tokens), in_memory(tokens), atol=0, rtol=0)
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(tmp_path / "q8", tmp_path / "again", 4)


def test_quantized_checkpoint_is_strict(tmp_path):
    model = random_tiny()
    save(model.state_dict(), model.args, tmp_path / "float")
    quantize_checkpoint(tmp_path / "float", tmp_path / "q", 8)
    f = tmp_path / "q" / "model.safetensors"
    sd = load_file(f)
    key = "layers.0.attention.wq.qweight"
    sd[key] = sd[key].to(torch.int16)
    save_file(sd, f)
    with pytest.raises(CheckpointError, match=f"tensor '{key}' is int16, but a 8-bit "
                       "checkpoint stores it as int8"):
        mixtral.load(tmp_path / "q")


def test_quantized_model_generates_and_batches():
    model = quantize_model(random_tiny(), 8)
    prompts = [[1, 415, 2936], [1, 28705, 9060, 349]]
    alone = [list(generate(model, p, GenerationParams(max_tokens=8))) for p in prompts]
    engine = Engine(model, max_batch=2)
    try:
        import threading
        results = []
        for p in prompts:
            tokens, done = [], threading.Event()
            engine.submit(p, GenerationParams(max_tokens=8), tokens.append,
                          lambda e, d=done: d.set())
            results.append((tokens, done))
        assert all(d.wait(30) for _, d in results)
    finally:
        engine.stop()
    assert [t for t, _ in results] == alone


def test_quantize_cli(tmp_path, capsys):
    model = random_tiny()
    save(model.state_dict(), model.args, tmp_path / "float")
    assert main(["quantize", str(tmp_path / "float"), str(tmp_path / "q4"), "--bits", "4"]) == 0
    assert main(["info", str(tmp_path / "q4")]) == 0
    assert "4-bit weights" in capsys.readouterr().out
    assert main(["quantize", str(tmp_path / "float"), str(tmp_path / "bad"), "--bits", "4",
                 "--group-size", "48"]) == 2
    assert "group size must be one of" in capsys.readouterr().err


def test_cpu64_layout_is_the_kernels():
    packed = torch.randint(0, 256, (128, 96), dtype=torch.uint8)
    from mixtral.quantize import int4_from_cpu64, int4_to_cpu64
    q = torch.stack([packed >> 4, packed & 15], dim=-1).flatten(-2).to(torch.int32)
    kernel = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(int4_to_cpu64(packed), kernel)
    assert int4_to_cpu64(packed).is_contiguous()
    assert torch.equal(int4_from_cpu64(kernel), packed)
