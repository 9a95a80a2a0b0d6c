"""Checkpoint files: strict loading errors, conversion round trips, config readers, memory."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import hf_mixtral, write_layout
from safetensors.torch import load_file, save_file

import mixtral
from mixtral.checkpoint import CheckpointError, convert, inspect
from mixtral.configs import args_from_hf_config, args_from_params


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite(path: Path, change) -> None:
    sd = load_file(path)
    change(sd)
    save_file(sd, path, metadata={"format": "pt"})


# --- every corrupt checkpoint gets its own error -------------------------------------------------

Q0 = "model.layers.0.self_attn.q_proj.weight"


def test_unknown_tensor(hf_tiny_dir, tmp_path):
    d = copy(hf_tiny_dir, tmp_path / "c")
    rewrite(d / "model.safetensors", lambda sd: sd.update({"model.layers.0.extra.weight":
                                                           torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensor "
                       r"'model.layers.0.extra.weight'"):
        mixtral.load(d)


def test_missing_tensor(hf_tiny_dir, tmp_path):
    d = copy(hf_tiny_dir, tmp_path / "c")
    rewrite(d / "model.safetensors", lambda sd: sd.pop(Q0))
    with pytest.raises(CheckpointError, match=rf"tensor '{Q0}' is missing \(expected shape "
                       r"\[64, 64\]"):
        mixtral.load(d)


def test_missing_expert(hf_tiny_dir, tmp_path):
    d = copy(hf_tiny_dir, tmp_path / "c")
    key = "model.layers.1.block_sparse_moe.experts.7.w2.weight"
    rewrite(d / "model.safetensors", lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=rf"'{key}' is missing"):
        mixtral.load(d)


def test_wrong_shape(hf_tiny_dir, tmp_path):
    d = copy(hf_tiny_dir, tmp_path / "c")
    rewrite(d / "model.safetensors", lambda sd: sd.update({Q0: torch.zeros(32, 64)}))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{Q0}' has shape "
                       r"\[32, 64\], but config.json implies \[64, 64\]"):
        mixtral.load(d)


def test_dtype_contradicting_config(hf_tiny_dir, tmp_path):
    d = copy(hf_tiny_dir, tmp_path / "c")
    rewrite(d / "model.safetensors", lambda sd: sd.update({Q0: sd[Q0].half()}))
    with pytest.raises(CheckpointError, match=rf"tensor '{Q0}' is float16 but config.json "
                       r"declares float32"):
        mixtral.load(d)


def test_mixed_dtypes_without_declared_dtype(hf_tiny, tmp_path):
    d = write_layout(hf_tiny, "mistral-safetensors", tmp_path / "m")
    key = "layers.0.attention.wk.weight"
    rewrite(d / "consolidated.safetensors", lambda sd: sd.update({key: sd[key].bfloat16()}))
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' is bfloat16 but the other "
                       r"tensors are float32"):
        mixtral.load(d)


def test_truncated_file(hf_tiny_dir, tmp_path):
    d = copy(hf_tiny_dir, tmp_path / "c")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '.*' ends at byte "
                       r"\d+ but the file has \d+ bytes: the file is truncated"):
        mixtral.load(d)


@pytest.mark.parametrize("garbage,message", [
    (b"\x05", "too short to be a safetensors file"),
    ((10**9).to_bytes(8, "little") + b"{}", "header claims 1000000000 bytes"),
    ((6).to_bytes(8, "little") + b"{nope}", "corrupt safetensors header"),
    ((40).to_bytes(8, "little") + b'{"x": {"dtype": "F32", "shape": [2]}}   ',
     "tensor 'x' has a malformed header entry"),
])
def test_corrupt_header(hf_tiny_dir, tmp_path, garbage, message):
    d = copy(hf_tiny_dir, tmp_path / "c")
    (d / "model.safetensors").write_bytes(garbage)
    with pytest.raises(CheckpointError, match=message):
        mixtral.load(d)


def test_missing_shard(hf_tiny, tmp_path):
    d = write_layout(hf_tiny, "hf-sharded", tmp_path / "s")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"shard {shard.name} is missing"):
        mixtral.load(d)


def test_index_pointing_at_wrong_shard(hf_tiny, tmp_path):
    d = write_layout(hf_tiny, "hf-sharded", tmp_path / "s")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    by_shard: dict[str, list[str]] = {}
    for k, v in index["weight_map"].items():
        by_shard.setdefault(v, []).append(k)
    shards = sorted(s for s, keys in by_shard.items() if len(keys) > 1)  # stays listed
    key = by_shard[shards[0]][0]
    index["weight_map"][key] = shards[1]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"lists tensor '{key}' in {shards[1]}, but it "
                       rf"is in {shards[0]}"):
        mixtral.load(d)


def test_corrupt_pth(hf_tiny, tmp_path):
    d = write_layout(hf_tiny, "mistral-pth", tmp_path / "p")
    f = d / "consolidated.00.pth"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth: cannot read this PyTorch "
                       r"checkpoint \(truncated or corrupt\?\)"):
        mixtral.load(d)


class Payload:
    """Unpickling this creates `marker`: if the file exists, a pickle ran."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _legacy(state: dict, path: Path) -> None:
    torch.save(state, path, _use_new_zipfile_serialization=False)


@pytest.mark.parametrize("write, message", [
    (_legacy, r"consolidated.00.pth: a legacy PyTorch checkpoint \(torch.save before PyTorch "
     r"1.6, .* a raw pickle stream, not a zip archive\), .* re-save it with a current PyTorch "
     r"\(torch.save\(torch.load\(f, weights_only=True\), f\)\) or convert it to safetensors"),
    (lambda state, path: path.write_bytes(pickle.dumps(state)),
     r"consolidated.00.pth: a bare pickle stream, not a PyTorch checkpoint"),
    (lambda state, path: path.write_bytes(b"GGUF" + bytes(60)),
     r"consolidated.00.pth: not a PyTorch checkpoint: torch.save writes a zip archive, and this "
     r"file does not start as one"),
    (lambda state, path: path.write_bytes(b""),
     r"consolidated.00.pth: not a PyTorch checkpoint: the file is empty"),
], ids=["legacy", "bare-pickle", "other-format", "empty"])
def test_pth_that_is_not_a_zip_is_named(hf_tiny, tmp_path, capsys, write, message):
    """Only a zip archive is unpickled (weights_only, memory-mapped); any other .pth is named
    from its first bytes, and a payload in it never runs."""
    from mixtral.cli import main

    d = write_layout(hf_tiny, "mistral-pth", tmp_path / "p")
    f = d / "consolidated.00.pth"
    Payload.marker = tmp_path / "payload-ran"
    write({**torch.load(f, weights_only=True), "payload": Payload()}, f)
    with pytest.raises(CheckpointError, match=message):
        mixtral.load(d)
    capsys.readouterr()
    assert main(["info", str(d)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not Payload.marker.exists()


def test_config_contradicting_weights(hf_tiny_dir, tmp_path):
    d = copy(hf_tiny_dir, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_local_experts"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: num_local_experts is 4, but the "
                       r"router model.layers.0.block_sparse_moe.gate.weight has shape \[8, 64\]"):
        mixtral.load(d)


@pytest.mark.parametrize("change,message", [
    ({"hidden_size": None}, "required field 'hidden_size' is missing"),
    ({"num_attention_heads": "four"}, "field 'num_attention_heads' must be int, got 'four'"),
    ({"num_key_value_heads": 3}, "n_heads=4 is not a multiple of n_kv_heads=3"),
    ({"model_type": "llama"}, "model_type is 'llama'; only 'mixtral' is supported"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings=true"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling"),
])
def test_bad_config_field(hf_tiny_dir, tmp_path, change, message):
    d = copy(hf_tiny_dir, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    with pytest.raises(CheckpointError, match=rf"config.json: .*{message}"):
        mixtral.load(d)


def test_no_weights_or_no_config(hf_tiny_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no weights found"):
        mixtral.load(tmp_path / "empty")
    d = copy(hf_tiny_dir, tmp_path / "c")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json beside the weights"):
        mixtral.load(d)
    with pytest.raises(CheckpointError, match="no such file or directory"):
        mixtral.load(tmp_path / "nope")


# --- config readers ------------------------------------------------------------------------------

def test_params_json_infers_rope_theta():
    base = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
            "n_kv_heads": 8, "norm_eps": 1e-05, "vocab_size": 32000,
            "moe": {"num_experts_per_tok": 2, "num_experts": 8}}  # the 8x7B release, verbatim
    args = args_from_params(base)
    assert args == mixtral.config.preset("mixtral-8x7b").with_(router_aux_loss_coef=0.02)
    assert args_from_params({**base, "sliding_window": "4096"}).rope_theta == 1e4
    with pytest.raises(ValueError, match="no 'moe' section: this is a dense model"):
        args_from_params({k: v for k, v in base.items() if k != "moe"})


def test_hf_config_readers_v4_and_v5():
    hub = {"architectures": ["MixtralForCausalLM"], "hidden_size": 4096,
           "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
           "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
           "num_key_value_heads": 8, "num_local_experts": 8, "rms_norm_eps": 1e-05,
           "rope_theta": 1e6, "router_aux_loss_coef": 0.02, "sliding_window": None,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32000}
    assert args_from_hf_config(hub) == mixtral.config.preset("mixtral-8x7b")
    v5 = {k: v for k, v in hub.items() if k != "rope_theta"}
    v5["rope_parameters"] = {"rope_theta": 1e6, "rope_type": "default"}
    v5["head_dim"] = None
    assert args_from_hf_config(v5) == args_from_hf_config(hub)


# --- conversion ----------------------------------------------------------------------------------

def test_convert_round_trip_is_bit_exact(hf_tiny, tmp_path):
    src = write_layout(hf_tiny, "hf-sharded", tmp_path / "src")
    (src / "tokenizer.model").write_bytes(b"spm")
    convert(src, tmp_path / "mistral", "mistral")
    convert(tmp_path / "mistral", tmp_path / "hf", "hf", max_shard_bytes=60_000)
    original = {k: v for f in src.glob("*.safetensors") for k, v in load_file(f).items()}
    back = {k: v for f in (tmp_path / "hf").glob("*.safetensors") for k, v in load_file(f).items()}
    assert set(back) == set(original)
    for k, v in original.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == b"spm"
    # and a second trip writes byte-identical files
    convert(tmp_path / "hf", tmp_path / "mistral2", "mistral")
    for name in ("consolidated.safetensors", "params.json"):
        assert (tmp_path / "mistral2" / name).read_bytes() == \
            (tmp_path / "mistral" / name).read_bytes()
    assert inspect(tmp_path / "hf").layout.name == "hf"
    assert inspect(tmp_path / "mistral").layout.name == "mistral"


def test_written_hf_checkpoint_loads_in_transformers(hf_tiny, tmp_path):
    from transformers import MixtralForCausalLM

    src = write_layout(hf_tiny, "mistral-fused-pt", tmp_path / "pt")
    convert(src, tmp_path / "hf", "hf")
    theirs = MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, hf_tiny(tokens).logits,
                                   atol=1e-4, rtol=0)


def test_convert_casts_dtype_and_refuses_to_overwrite(hf_tiny_dir, tmp_path):
    convert(hf_tiny_dir, tmp_path / "bf16", "mistral", dtype="bf16")
    info = inspect(tmp_path / "bf16")
    assert info.dtype == torch.bfloat16 and info.layout.name == "mistral"
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        convert(hf_tiny_dir, tmp_path / "bf16", "hf")


# --- memory --------------------------------------------------------------------------------------

def test_loading_does_not_hold_two_copies(tmp_path):
    """Peak RSS while loading stays close to the weight bytes (a second copy would double it)."""
    hf = hf_mixtral(vocab_size=32000, hidden_size=256, intermediate_size=1024,
                    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                    dtype=torch.bfloat16)
    path = write_layout(hf, "hf", tmp_path / "big")
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    del hf
    script = textwrap.dedent(f"""
        import torch, mixtral
        from mixtral.model import Transformer
        from mixtral.checkpoint import inspect

        def status(field):  # kB -> bytes
            line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
            return int(line.split()[1]) * 1024

        with torch.device("meta"):
            Transformer(inspect({str(path)!r}).args)  # warm up everything but the weights
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to now
        before = status("VmRSS")
        model = mixtral.load({str(path)!r})
        print(status("VmHWM") - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    peak_growth = int(out.stdout.strip().splitlines()[-1])
    print(f"weights {weight_bytes / 2**20:.1f} MiB, peak RSS growth {peak_growth / 2**20:.1f} MiB")
    assert peak_growth < 1.25 * weight_bytes



def test_a_load_reports_its_bytes_and_a_big_one_shows_a_bar_on_a_terminal(monkeypatch,
                                                                          hf_tiny_dir, tmp_path):
    """load reports ("loading", bytes read, bytes in all) after each tensor, up to the total
    (float and quantized checkpoints); the commands draw it as a bar on stderr only for a load
    over LOAD_BAR_BYTES and only on a terminal."""
    import argparse
    import io

    from mixtral import assemble
    from mixtral.checkpoint import quantize_checkpoint

    quantize_checkpoint(hf_tiny_dir, tmp_path / "q8", 8)
    for path in (hf_tiny_dir, tmp_path / "q8"):
        calls: list[tuple[str, int, int]] = []
        mixtral.checkpoint.load(path, progress=lambda *c, calls=calls: calls.append(c))
        total = inspect(path).nbytes
        assert calls[-1] == ("loading", total, total) and len(calls) > 10
        assert [c[1] for c in calls] == sorted(c[1] for c in calls)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    parser = argparse.ArgumentParser()
    assemble.add_arguments(parser)
    args = parser.parse_args(["--model", str(hf_tiny_dir)])
    for tty, limit, shown in ((True, 1, True), (True, 10**9, False), (False, 1, False)):
        err = Terminal() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        monkeypatch.setattr(assemble, "LOAD_BAR_BYTES", limit)
        assemble.from_args(args)
        assert (f"{hf_tiny_dir.name}: loading" in err.getvalue()) == shown, (tty, limit)
