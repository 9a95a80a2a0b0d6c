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
from mixtral.quant import Int4Linear, Int8Linear, QuantExperts, quantize_model
from mixtral.quant.int4 import dequantize as int4_dequantize
from mixtral.quant.int4 import from_cpu64, to_cpu64
from mixtral.quant.int4 import quantize as int4_quantize
from mixtral.quant.int8 import quantize as int8_quantize


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


def test_legacy_cpu64_bytes_are_read_as_documented():
    """mixtral 0.1's cpu64 layout, spelled out byte by byte from its definition (rows in blocks
    of 64; byte (kk, 32*parity + n) of a block holds row n's column 2kk + parity in the low
    nibble and row n + 32's in the high one), read back into the portable bytes."""
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (2, 128, 12), dtype=torch.uint8, generator=g)  # [E, N, K/2]
    q = torch.stack([packed >> 4, packed & 15], dim=-1).flatten(-2)  # [E, N, K] values
    legacy = torch.zeros_like(packed)
    for e in range(2):
        for b in range(2):
            block = legacy[e, b * 64:(b + 1) * 64].view(-1)  # [K/2 * 64] bytes
            for kk in range(12):
                for parity in range(2):
                    for n in range(32):
                        lo = q[e, b * 64 + n, 2 * kk + parity]
                        hi = q[e, b * 64 + n + 32, 2 * kk + parity]
                        block[kk * 64 + 32 * parity + n] = lo | (hi << 4)
    assert torch.equal(to_cpu64(packed), legacy)
    assert torch.equal(from_cpu64(legacy), packed)


def write_legacy_cpu64(src, dst):
    """A copy of the portable int4 checkpoint `src` as mixtral 0.1 wrote `--layout cpu64`."""
    import json
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["mixtral_quantization"]["layout"] = "cpu64"
    (dst / "config.json").write_text(json.dumps(config))
    for f in dst.glob("*.safetensors"):
        sd = load_file(f)
        save_file({k: to_cpu64(v) if k.endswith(".qweight") else v for k, v in sd.items()}, f)


def test_legacy_cpu64_checkpoints_load_to_the_same_model(tmp_path, capsys):
    from mixtral.config import ModelArgs

    model = Transformer(ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                                  hidden_dim=256, vocab_size=32000, max_seq_len=256))
    model.init_weights(std=0.05, generator=torch.Generator().manual_seed(0))
    save(model.state_dict(), model.args, tmp_path / "float")
    quantize_checkpoint(tmp_path / "float", tmp_path / "q4", 4)
    write_legacy_cpu64(tmp_path / "q4", tmp_path / "old")
    tokens = torch.randint(0, 32000, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(mixtral.load(tmp_path / "old")(tokens),
                                   mixtral.load(tmp_path / "q4")(tokens), atol=0, rtol=0)
    # and none is written any more
    assert main(["quantize", str(tmp_path / "float"), str(tmp_path / "new"), "--bits", "4",
                 "--layout", "cpu64"]) == 2
    assert "no longer written" in capsys.readouterr().err


def test_quantize_and_convert_report_their_bytes(tmp_path):
    """progress(stage, done, total) in bytes: done rises to total, which is what is read (the
    canonical tensors, in the asked dtype) or written (the shards' tensors)."""
    from mixtral.checkpoint import convert

    model = random_tiny()
    save(model.state_dict(), model.args, tmp_path / "float")

    def written(files: list) -> int:
        return sum(t.numel() * t.element_size() for f in files if f.suffix == ".safetensors"
                   for t in load_file(f).values())

    def stages(calls: list) -> dict[str, list[tuple[int, int]]]:
        out: dict[str, list[tuple[int, int]]] = {}
        for stage, done, total in calls:
            out.setdefault(stage, []).append((done, total))
        for steps in out.values():
            dones = [d for d, _ in steps]
            assert dones == sorted(dones) and len({t for _, t in steps}) == 1
        return out

    calls: list = []
    files = quantize_checkpoint(tmp_path / "float", tmp_path / "q8", 8, max_shard_bytes=2**18,
                                progress=lambda *a: calls.append(a))
    assert len([f for f in files if f.suffix == ".safetensors"]) > 1  # several shards
    got = stages(calls)
    assert list(got) == ["writing"] and got["writing"][-1] == (written(files),) * 2

    calls = []
    files = convert(tmp_path / "float", tmp_path / "bf16", "hf", "bf16", 2**18,
                    progress=lambda *a: calls.append(a))
    got = stages(calls)  # convert streams: each tensor is written as it is read
    read = sum(t.numel() * 2 for t in model.state_dict().values())  # bf16: 2 bytes each
    assert list(got) == ["writing"] and got["writing"][-1] == (read, read) == (written(files),) * 2
