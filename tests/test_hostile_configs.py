"""Configs that lie or are absurd, and checkpoints bigger than the memory there is: each refused
with a named reason before anything sized by the lie is built (no allocation proportional to a
number in the file), and through the CLI with status 2 and one line."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hostile import ARGS, attempt, checkpoint, cli_refuses, header_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mixtral
from mixtral import memory
from mixtral.checkpoint import CheckpointError, quantize_checkpoint
from mixtral.memory import NotEnoughMemoryError

CASES = {"configs": 0}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    yield checkpoint(tmp_path_factory.mktemp("ckpt"))
    print(f"\nhostile configs: {CASES['configs']} fuzz cases")


def with_config(ckpt: Path, work: Path, change: dict) -> Path:
    work.mkdir(exist_ok=True)
    shutil.copyfile(ckpt / "model.safetensors", work / "model.safetensors")
    cfg = {**json.loads((ckpt / "config.json").read_text()), **change}
    (work / "config.json").write_text(json.dumps(cfg))  # NaN and Infinity literals allowed
    return work


@pytest.mark.parametrize("change,reason", [
    ({"num_hidden_layers": 10**6}, "num_hidden_layers is 1000000, but the weights hold 2 "
     r"layers \(0 to 1\)"),
    ({"num_local_experts": 10**7}, "num_local_experts is 10000000, but the router "
     r"model.layers.0.block_sparse_moe.gate.weight has shape \[4, 64\]"),
    ({"num_hidden_layers": 10**18, "num_local_experts": 10**18}, "num_hidden_layers"),
    ({"max_position_embeddings": 10**12}, "max_position_embeddings is 1000000000000, over"),
    ({"hidden_size": 10**12}, "has shape"),
    ({"vocab_size": 10**15}, r"has shape \[320, 64\], but config.json implies"),
    ({"intermediate_size": 2**62}, "has shape"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok=9 exceeds"),
    ({"rope_theta": float("inf")}, "must be positive and finite"),
    ({"rms_norm_eps": float("nan")}, "must be positive and finite"),
    ({"num_hidden_layers": -1}, "n_layers must be a positive integer"),
    ({"num_hidden_layers": 2.5}, "must be int, got 2.5"),
    ({"torch_dtype": ["bfloat16"]}, r"unknown dtype \['bfloat16'\]"),
    ({"mixtral_quantization": {"bits": 4, "group_size": 10**9}}, "mixtral_quantization must"),
])
def test_lying_config_is_refused_by_name(ckpt, tmp_path, change, reason):
    path = with_config(ckpt, tmp_path / "w", change)
    with pytest.raises(CheckpointError, match=reason):
        attempt(path, strict=True)
    assert "config.json" in cli_refuses(["info", str(path)])


def test_lying_params_json(tmp_path):
    path = checkpoint(tmp_path / "m", layout="mistral")
    params = json.loads((path / "params.json").read_text())
    params["moe"]["num_experts"] = 10**7
    (path / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match=r"params.json: moe.num_experts is 10000000"):
        attempt(path, strict=True)


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a":' * 50_000, "[]", "\udcff"])
def test_config_that_is_not_a_config(ckpt, tmp_path, text):
    path = with_config(ckpt, tmp_path / "w", {})
    (path / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(CheckpointError, match=r"config.json: (not valid JSON|JSON nested too "
                       r"deeply|expected a JSON object|not UTF-8)"):
        attempt(path, strict=True)
    cli_refuses(["info", str(path)])


NUMBERS = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([0, 1, 2, 10**6, 10**9, 2**63]),
                    st.floats(), st.booleans(), st.none(), st.text(max_size=6),
                    st.lists(st.integers(), max_size=2))
FIELDS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
          "vocab_size", "rope_theta", "rms_norm_eps", "max_position_embeddings",
          "sliding_window", "router_aux_loss_coef", "torch_dtype"]


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(change=st.dictionaries(st.sampled_from(FIELDS), NUMBERS, min_size=1, max_size=3))
def test_absurd_configs(ckpt, tmp_path, change):
    """Loaded or refused by name; attempt() fails on any other exception and on allocations
    beyond what the files justify."""
    CASES["configs"] += 1
    attempt(with_config(ckpt, tmp_path / "w", change))


# --- memory -------------------------------------------------------------------------------------

def test_too_big_for_memory_is_refused_before_loading(ckpt, monkeypatch):
    monkeypatch.setattr(memory, "available", lambda: (100_000, "a test's limit"))
    with pytest.raises(NotEnoughMemoryError, match=r"loading .* needs 0.00 GiB but only 0.00 GiB "
                       r"is available \(a test's limit\); load a quantized copy"):
        attempt(ckpt, strict=True)
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    assert attempt(ckpt) == "loaded"


def test_offloaded_load_needs_only_its_budget(ckpt, tmp_path, monkeypatch):
    q4 = tmp_path / "q4"
    quantize_checkpoint(ckpt, q4, bits=4, group_size=32)
    size = sum(f.stat().st_size for f in q4.iterdir())
    monkeypatch.setattr(memory, "available", lambda: (10 * size, "a test's limit"))
    mixtral.load(q4, max_ram="2GiB")  # the budget is larger than memory, the model is not
    monkeypatch.setattr(memory, "available", lambda: (size // 10, "a test's limit"))
    with pytest.raises(NotEnoughMemoryError, match=r"with --max-ram 2.00 GiB needs .* lower "
                       "--max-ram"):
        mixtral.load(q4, max_ram="2GiB")


def sparse_checkpoint(ckpt: Path, folder: Path, vocab: int) -> Path:
    """The small checkpoint with a vocabulary of `vocab`: ~vocab * 256 bytes of embeddings,
    all zeros, in a sparse file that takes no disk."""
    folder.mkdir()
    cfg = {**json.loads((ckpt / "config.json").read_text()), "vocab_size": vocab}
    (folder / "config.json").write_text(json.dumps(cfg))
    _, header, _ = header_of(ckpt / "model.safetensors")
    header.pop("__metadata__", None)
    at = 0
    for name in sorted(header):  # every tensor is bf16: 2 bytes an element
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            header[name]["shape"] = [vocab, ARGS.dim]
        nbytes = 2 * math.prod(header[name]["shape"])
        header[name]["data_offsets"] = [at, at + nbytes]
        at += nbytes
    text = json.dumps(header).encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + at)
    return folder


def test_cli_under_an_address_space_limit(ckpt, tmp_path):
    """`ulimit -v` below the weights: status 2 and a named reason, where the allocator's error
    came before (a traceback); a config claiming a million layers refused as fast."""
    big = sparse_checkpoint(ckpt, tmp_path / "big", vocab=2**23)  # 2 x 1 GiB of embeddings
    lying = with_config(ckpt, tmp_path / "lying", {"num_hidden_layers": 10**6})
    script = textwrap.dedent("""
        import resource, sys
        from mixtral.cli import main
        import mixtral.checkpoint, mixtral.offload  # imported before the limit
        size = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmSize"))
        limit = size * 1024 + 768 * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        sys.exit(main(sys.argv[1:]))
    """)
    runs = {"big": ["generate", "--model", str(big), "--prompt", "x", "--max-tokens", "1"],
            "lying": ["info", str(lying)]}
    for name, argv in runs.items():
        out = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert out.stderr.count("\n") == 1, out.stderr
        assert re.search(r"needs \d+\.\d\d GiB but only \d+\.\d\d GiB is available \(RLIMIT_AS"
                         if name == "big" else "num_hidden_layers is 1000000", out.stderr)
