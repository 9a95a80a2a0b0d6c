"""GGUF files read into our model. Two oracles: llama.cpp's own converter (its tensor names and
q/k permutation are the truth) run on the default model when its source is on this machine,
and files written here with the gguf package's GGUFWriter, whose every tensor the gguf
package dequantizes: the model we load must hold exactly those values (the exact int4 types)
or be within our format's rounding of them (the re-quantized ones), compared whole."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf_files import ARGS, random_state, write_gguf

from mixtral import quant
from mixtral.checkfile import CheckpointError
from mixtral.checkpoint import load
from mixtral.checkpoint.gguf import _mixtral_pieces, describe, open_gguf
from mixtral.cli import main
from mixtral.config import ModelArgs
from mixtral.model import Transformer

DEFAULT = Path(__file__).parent.parent / "mixtral" / "data" / "default"
TOKENS = torch.tensor([[1, 415, 2936, 9060, 285, 1142, 28705, 28770]])
def reference(state: dict[str, torch.Tensor], args: ModelArgs = ARGS) -> Transformer:
    model = Transformer(args)
    model.load_state_dict(state)
    return model.eval()


def logits(model: Transformer) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS % model.args.vocab_size)


@pytest.mark.parametrize("per_expert", [False, True], ids=["stacked", "per-expert"])
def test_float_file_is_the_model_it_holds(tmp_path, per_expert):
    state = random_state()
    meant = write_gguf(tmp_path / "m.gguf", state, per_expert=per_expert)
    calls: list[tuple[str, int, int]] = []
    model = load(tmp_path / "m.gguf", progress=lambda *c: calls.append(c))
    assert model.tok_embeddings.weight.dtype == torch.float32  # as stored
    tensor_bytes = sum(t.numel() * 4 for t in state.values())
    assert calls[-1] == ("loading", tensor_bytes, tensor_bytes)
    for k, v in model.state_dict().items():
        assert torch.equal(v, meant[k]), k
    torch.testing.assert_close(logits(model), logits(reference(meant)), atol=0, rtol=0)


@pytest.mark.parametrize("kind", [T.Q4_0, T.Q4_1, T.Q4_K])
def test_four_bit_types_map_exactly_into_int4(tmp_path, kind):
    state = random_state(1)
    meant = write_gguf(tmp_path / "m.gguf", state, {w: kind for w in
                       ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")})
    notes: list[str] = []
    model = load(tmp_path / "m.gguf", dtype="fp32", announce=notes.append)
    assert f"{kind.name} x15 -> int4, groups of 32 (exact)" in notes[0]
    layer = model.layers[1]
    for name, module in [("layers.1.attention.wk.weight", layer.attention.wk),
                         ("output.weight", model.output)]:
        assert isinstance(module, quant.Int4Linear) and module.group_size == 32
        w = quant.get(4).dequantize(module.weight, module.scales_and_zeros, 32)
        torch.testing.assert_close(w, meant[name], atol=1e-6, rtol=1e-6)  # fp32 scale*q+zero
    experts = layer.feed_forward.experts
    w2 = torch.stack([quant.get(4).dequantize(m.weight, m.scales_and_zeros, 32)
                      for m in experts.w2])
    torch.testing.assert_close(w2, meant["layers.1.feed_forward.experts.w2"], atol=1e-6,
                               rtol=1e-6)
    torch.testing.assert_close(logits(model), logits(reference(meant)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", [T.Q8_0, T.Q5_K, T.Q6_K])
def test_other_types_requantize_into_int8_within_its_rounding(tmp_path, kind):
    state = random_state(2)
    meant = write_gguf(tmp_path / "m.gguf", state, {w: kind for w in
                       ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")})
    notes: list[str] = []
    model = load(tmp_path / "m.gguf", dtype="fp32", announce=notes.append)
    assert f"{kind.name} x15 -> int8, a scale per row (re-quantized, relative RMS error" \
        in notes[0]
    wo = model.layers[0].attention.wo
    assert isinstance(wo, quant.Int8Linear)
    err = (quant.get(8).dequantize(wo.weight, wo.scales) - meant["layers.0.attention.wo.weight"])
    assert (err.abs() <= wo.scales[:, None] / 2 + 1e-7).all()  # half a step, every weight
    # re-quantized exactly as our own int8 quantization of the values the file stands for
    want = logits(quant.quantize_model(reference(meant), 8))
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=1e-5)


def test_a_type_the_gguf_package_cannot_decode_is_named(tmp_path, monkeypatch):
    # as a file from a llama.cpp newer than the installed gguf package would fail
    write_gguf(tmp_path / "m.gguf", random_state(2), {"w2": T.Q6_K})

    def cannot(data, kind):
        raise NotImplementedError(f"Dequantization for {kind.name} is not yet implemented")

    monkeypatch.setattr(gguf.quants, "dequantize", cannot)
    with pytest.raises(CheckpointError, match=r"m.gguf: layers.0.feed_forward.experts.w2 is "
                       r"stored as Q6_K, which the installed gguf package cannot decode "
                       r"\(pip install -U gguf\)"):
        load(tmp_path / "m.gguf", dtype="fp32")


def test_mixed_types_like_q4_k_m(tmp_path):
    """Q4_K_M keeps gate/up in Q4_K and down in Q6_K: each bank in its own format."""
    state = random_state(3)
    kinds = {"wq": T.Q4_K, "wk": T.Q4_K, "wv": T.Q6_K, "wo": T.Q4_K, "w1": T.Q4_K,
             "w2": T.Q6_K, "w3": T.Q4_K, "output": T.Q6_K}
    meant = write_gguf(tmp_path / "m.gguf", state, kinds)
    model = load(tmp_path / "m.gguf", dtype="fp32")
    experts = model.layers[0].feed_forward.experts
    assert isinstance(experts, quant.QuantExperts)
    assert isinstance(experts.w1[0], quant.Int4Linear) and isinstance(experts.w2[0],
                                                                      quant.Int8Linear)
    int8 = quant.get(8).quantize(meant["layers.0.feed_forward.experts.w2"][3])
    torch.testing.assert_close((experts.w2[3].weight, experts.w2[3].scales), int8, atol=0, rtol=0)
    int4 = experts.w3[2]
    torch.testing.assert_close(quant.get(4).dequantize(int4.weight, int4.scales_and_zeros, 32),
                               meant["layers.0.feed_forward.experts.w3"][2], atol=1e-6, rtol=1e-6)
    assert torch.isfinite(logits(model)).all()
    loaded = load(tmp_path / "m.gguf")  # a quantized file computes in bf16 unless asked
    assert loaded.tok_embeddings.weight.dtype == torch.bfloat16


def test_vocabulary_must_be_mixtrals(tmp_path):
    state = random_state()
    pieces = list(_mixtral_pieces())
    pieces[5] = "▁hello"
    write_gguf(tmp_path / "other.gguf", state, tokens=pieces)
    with pytest.raises(CheckpointError, match="its vocabulary is not Mixtral's: piece 5 is "
                       "'▁hello' where Mixtral's is '<0x02>'"):
        load(tmp_path / "other.gguf")
    write_gguf(tmp_path / "small.gguf", state, tokens=[f"p{i}" for i in range(320)])
    with pytest.raises(CheckpointError, match=r"vocabulary \('llama' tokenizer, 320 pieces\) "
                       r"is not Mixtral's \(SentencePiece, 32000 pieces\)"):
        load(tmp_path / "small.gguf")


def test_bad_files_are_clear_errors(tmp_path):
    state = random_state()
    good = tmp_path / "good.gguf"
    write_gguf(good, state)
    data = good.read_bytes()
    cases = {
        "truncated.gguf": (data[: len(data) // 2], "not a readable GGUF file"),
        "magic.gguf": (b"GGUX" + data[4:], "does not start with GGUF's magic"),
        "counts.gguf": (data[:8] + (2**40).to_bytes(8, "little") + data[16:],
                        "the header claims 1099511627776 tensors"),
        "version.gguf": (data[:4] + (9).to_bytes(4, "little") + data[8:], "GGUF version 9"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=message):
            load(tmp_path / name)
    write_gguf(tmp_path / "qwen.gguf", state, arch="qwen2")
    with pytest.raises(CheckpointError, match="architecture 'qwen2'"):
        load(tmp_path / "qwen.gguf")
    write_gguf(tmp_path / "short.gguf", {k: v for k, v in state.items() if "layers.1.ffn_norm"
                                         not in k})
    with pytest.raises(CheckpointError, match="tensor 'blk.1.ffn_norm.weight' is missing"):
        load(tmp_path / "short.gguf")
    write_gguf(tmp_path / "shape.gguf", state, args=ARGS.with_(hidden_dim=512))
    with pytest.raises(CheckpointError, match="ffn_gate_exps.weight' has shape"):
        load(tmp_path / "shape.gguf")


def test_a_layer_with_float_and_quantized_banks_loads_them_all_float(tmp_path):
    """An expert bank is one kind (float, or QuantExperts): where a file keeps one bank float
    and others quantized, every bank of the layer is dequantized straight from the file into
    float, exactly (not through our int8 first), and the load says so."""
    state = random_state(4)
    kinds = {"w1": T.F32, "w2": T.Q6_K, "w3": T.Q4_0, "wq": T.Q6_K}
    for per_expert in (False, True):
        path = tmp_path / f"mixed-{per_expert}.gguf"
        meant = write_gguf(path, state, kinds, per_expert=per_expert)
        notes: list[str] = []
        model = load(path, dtype="fp32", announce=notes.append)
        n = ARGS.num_experts if per_expert else 1
        assert f"Q6_K x{2 * n} -> float, dequantized (exact)" in notes[0]
        assert f"Q4_0 x{2 * n} -> float, dequantized (exact)" in notes[0]
        assert "Q6_K x2 -> int8, a scale per row (re-quantized" in notes[0]  # wq, 2 layers
        rows = {(r["type"], r["loads_as"]): r["tensors"]  # info says what the load did
                for r in describe(open_gguf(path))["tensor_types"]}
        assert rows[("Q6_K", "float, dequantized")] == rows[("Q4_0", "float, dequantized")] \
            == 2 * n and rows[("Q6_K", "int8, a scale per row")] == 2
        experts = model.layers[1].feed_forward.experts
        assert not isinstance(experts, quant.QuantExperts)
        for w in ("w1", "w2", "w3"):
            name = f"layers.1.feed_forward.experts.{w}"
            assert torch.equal(model.state_dict()[name], meant[name]), (per_expert, w)
        assert isinstance(model.layers[0].attention.wq, quant.Int8Linear)
        want = logits(quant.quantize_model(reference(meant), 8))  # wq as our int8 of it
        ours = reference(meant)
        for i in range(ARGS.n_layers):
            ours.layers[i].attention.wq = model.layers[i].attention.wq
        torch.testing.assert_close(logits(model), logits(ours), atol=1e-5, rtol=1e-5)
        assert not torch.equal(logits(model), want)  # the experts are not re-quantized


def test_info_describes_a_gguf(tmp_path, capsys):
    import json

    from mixtral.assemble import preflight

    kinds = {"wq": T.Q4_K, "wk": T.Q4_K, "wv": T.Q6_K, "wo": T.Q4_K, "w1": T.Q4_K,
             "w2": T.Q6_K, "w3": T.Q4_K, "output": T.Q6_K}
    write_gguf(tmp_path / "m.gguf", random_state(), kinds,
               named=("Mixtral Small Test", gguf.LlamaFileType.MOSTLY_Q4_K_M))
    assert preflight(tmp_path / "m.gguf") == "m"  # serve's model name: the file's stem
    assert main(["info", str(tmp_path / "m.gguf"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["source"] == "gguf"
    assert report["args"] == {**ARGS.to_dict(), "norm_eps": pytest.approx(1e-5)}  # as fp32
    g = report["gguf"]
    assert (g["architecture"], g["name"], g["file_type"], g["tensors"], g["dtype"]) == \
        ("llama", "Mixtral Small Test", "Q4_K_M", 23, "bfloat16")
    rows = {(r["type"], r["loads_as"]): (r["tensors"], r["exact"]) for r in g["tensor_types"]}
    assert rows == {("Q4_K", "int4, groups of 32"): (10, True),  # wq wk wo w1 w3, 2 layers
                    ("Q6_K", "int8, a scale per row"): (5, False),  # wv w2 x2, output
                    ("F32", "float"): (8, True)}  # embeddings, 3 norms, 2 routers
    assert sum(r["bytes"] for r in g["tensor_types"]) < g["bytes"]
    notes: list[str] = []  # what info says is what loading does
    load(tmp_path / "m.gguf", announce=notes.append)
    assert "Q4_K x10 -> int4, groups of 32 (exact)" in notes[0]
    assert "Q6_K x5 -> int8, a scale per row (re-quantized" in notes[0]
    assert main(["info", str(tmp_path / "m.gguf")]) == 0
    text = capsys.readouterr().out
    assert 'gguf          llama architecture "Mixtral Small Test", file type Q4_K_M: 23 ' \
        'tensors' in text
    assert "Q4_K   x10" in text and "-> int4, groups of 32 (exact)" in text
    assert "-> int8, a scale per row (re-quantized)" in text


# --- llama.cpp's own converter, when its source is on this machine --------------------------------

def _converter() -> Path | None:
    roots = [os.environ.get("LLAMA_CPP_SRC", "")] + \
        sorted(glob.glob("/tmp/llama-sdist/llama_cpp_python-*/vendor/llama.cpp"))
    found = [Path(r) / "convert_hf_to_gguf.py" for r in roots if r]
    return next((p for p in found if p.exists()), None)


CONVERTER = _converter()


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    if CONVERTER is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py is not on this machine (set LLAMA_CPP_SRC "
                    "to a llama.cpp source tree; benchmarks/anchors/convert_gguf.sh fetches one)")
    from mixtral.tokenizer import default_tokenizer

    root = tmp_path_factory.mktemp("llama_cpp")
    model = root / "default"
    model.mkdir()
    for f in ("config.json", "model.safetensors"):
        (model / f).symlink_to(DEFAULT / f)
    (model / "tokenizer.model").symlink_to(default_tokenizer().model_file)
    out = {}
    for kind in ("f32", "q8_0"):
        out[kind] = root / f"default-{kind}.gguf"
        subprocess.run([sys.executable, str(CONVERTER), str(model), "--outtype", kind,
                        "--outfile", str(out[kind])], check=True, capture_output=True,
                       env={k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"})
    return out


def test_llama_cpps_f32_file_is_the_hf_checkpoint(converted, capsys):
    want = logits(load(DEFAULT, dtype="fp32"))
    torch.testing.assert_close(logits(load(converted["f32"])), want, atol=1e-4, rtol=0)
    argv = ["--prompt", "Hello", "--max-tokens", "4", "--temperature", "0"]
    assert main(["generate", "--model", str(DEFAULT), "--dtype", "fp32", *argv]) == 0
    hf = capsys.readouterr().out
    assert main(["generate", "--model", str(converted["f32"]), *argv]) == 0
    assert capsys.readouterr().out == hf


def test_llama_cpps_q8_0_file_within_the_int8_bound(converted):
    """Q8_0 (blocks of 32) re-quantized to our int8 (a scale per row) loses about what our
    own int8 quantization of the float model does (test_quantize's bound)."""
    want = logits(load(DEFAULT, dtype="fp32"))
    got = logits(load(converted["q8_0"], dtype="fp32"))
    ours = Transformer(load(DEFAULT, dtype="fp32").args)
    ours.load_state_dict(load(DEFAULT, dtype="fp32").state_dict())
    direct = logits(quant.quantize_model(ours.eval(), 8))
    err, direct_err = ((got - want).norm() / want.norm()).item(), \
        ((direct - want).norm() / want.norm()).item()
    assert err < 0.1 and err < 2 * direct_err, (err, direct_err)
