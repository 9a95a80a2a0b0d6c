"""Every CPU tier, each in a fresh process (MIXTRAL_ISA set before PyTorch starts, so PyTorch's
own dispatch and int4 packing follow the cap too), and an emulated AVX2 CPU under QEMU: the
files we write mean the same on every machine, and the main job runs on each."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiers_up_to_machine

from mixtral.checkpoint import quantize_checkpoint, save
from mixtral.config import ModelArgs
from mixtral.model import Transformer

# sizes our kernels take (K % 64, int4 group 64) so that every path runs at its own tier
ARGS = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256,
                 vocab_size=512, max_seq_len=64)

LOGITS = """
import sys, torch, mixtral
from mixtral import cpu
from mixtral.cache import KVCache
from mixtral.fast import optimize
model = optimize(mixtral.load(sys.argv[1]))
tokens = torch.arange(1, 13).view(1, 12) * 37 % 512
cache = KVCache(model.args, 1, 32, torch.float32)
with torch.no_grad():
    steps = [model(tokens[:, :8], torch.arange(8)[None], cache)[0, -1]]
    for t in range(8, 12):  # decoding steps: the matrix-vector kernels and the fused steps
        steps.append(model(tokens[:, t:t + 1], torch.tensor([[t]]), cache)[0, -1])
torch.save(torch.stack(steps), sys.argv[2])
c = cpu.probe()
print(c.tier, c.aten)
"""

pytestmark = pytest.mark.slow  # fresh processes per CPU tier, one under QEMU


def run(args: list[str], tier: str | None, activations: str | None = None,
        **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in
           ("MIXTRAL_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MIXTRAL_ACTIVATIONS")}
    if tier is not None:
        env["MIXTRAL_ISA"] = tier
    if activations is not None:
        env["MIXTRAL_ACTIVATIONS"] = activations
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def float_model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiers")
    model = Transformer(ARGS)
    model.init_weights(std=0.05, generator=torch.Generator().manual_seed(0))
    save(model.state_dict(), ARGS, d / "float")
    return d / "float"


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_files_are_the_same_bytes_from_every_tier(float_model, tmp_path, bits):
    """Written by the lowest tier in a fresh process and by this one: identical files."""
    quantize_checkpoint(float_model, tmp_path / "here", bits)
    done = run([sys.executable, "-m", "mixtral", "quantize", str(float_model),
                str(tmp_path / "generic"), "--bits", str(bits)], "generic")
    assert done.returncode == 0, done.stderr
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "here" / name).read_bytes() == \
            (tmp_path / "generic" / name).read_bytes(), name


@pytest.mark.parametrize("bits", [8, 4])
def test_a_file_gives_the_same_logits_on_every_tier(float_model, tmp_path, bits):
    """One int8/int4 file, loaded in a fresh process at each tier this machine can be capped
    to (each with its own kernels, or PyTorch's packed for that CPU): prefill and decoding
    logits agree within 1e-4 of the largest logit on float activations (fp32 arithmetic; sums
    in other orders); on int8 activations (AVX2's default) each step's logits within 2e-2
    relative L2 of those."""
    quantize_checkpoint(float_model, tmp_path / "q", bits, group_size=64)
    script = tmp_path / "logits.py"
    script.write_text(LOGITS)
    logits = {}
    for param in tiers_up_to_machine():
        tier = param.values[0]
        if param.marks:
            continue
        done = run([sys.executable, str(script), str(tmp_path / "q"), str(tmp_path / tier)],
                   tier, "float")
        assert done.returncode == 0, done.stderr
        got_tier, aten = done.stdout.split()
        assert got_tier == tier
        assert aten == {"generic": "DEFAULT", "avx2": "AVX2"}.get(tier, aten)  # PyTorch follows
        logits[tier] = torch.load(tmp_path / tier)
    first = next(iter(logits.values()))
    bound = 1e-4 * first.abs().max().item()
    for tier, out in logits.items():
        assert out.shape == (5, ARGS.vocab_size)
        torch.testing.assert_close(out, first, atol=bound, rtol=0, msg=tier)
    if "avx2" in logits:
        done = run([sys.executable, str(script), str(tmp_path / "q"), str(tmp_path / "int8")],
                   "avx2")  # the tier's default activations
        assert done.returncode == 0, done.stderr
        out = torch.load(tmp_path / "int8")
        error = (out - first).norm(dim=-1) / first.norm(dim=-1)
        assert (error > 1e-5).all() and (error < 5e-2).all(), error  # measured 1-3.5e-2


# --- an emulated AVX2 CPU ----------------------------------------------------------------------

QEMU = shutil.which("qemu-x86_64")
JSON_PROMPT = ("You are a helpful code assistant. Your task is to generate a valid JSON object "
               "based on the given information:\nname: John\nlastname: Smith\naddress: #1 Samuel "
               "St.\nJust generate the JSON object without explanations:")


@pytest.mark.emulated
@pytest.mark.skipif(platform.machine() != "x86_64" or QEMU is None,
                    reason="needs an x86-64 host with Debian's qemu-user (make test installs it)")
def test_main_job_on_an_emulated_avx2_cpu(tmp_path):
    """`mixtral generate` under `qemu-x86_64 -cpu Haswell` (AVX2 + FMA, no AVX-512), with the
    default model and an int4 copy of it: the same answer as this machine's native run. Before
    the CPU probe this crashed (oneDNN's bf16 packing) and int4 answered garbage."""
    assert QEMU is not None
    from mixtral.default_model import HAS_SHIPPED, SHIPPED

    int4 = tmp_path / "int4"
    quantize_checkpoint(SHIPPED if HAS_SHIPPED else _random_default(tmp_path), int4, 4)
    command = [sys.executable, "-m", "mixtral", "generate", "--chat", "--prompt", JSON_PROMPT,
               "--temperature", "0", "--max-tokens", "32", "--json"]
    for model in ([] if HAS_SHIPPED else ["--model", str(tmp_path / "float")]), \
            ["--model", str(int4)]:
        native = run(command + model, None)
        emulated = run([QEMU, "-cpu", "Haswell", *command, *model], None)
        assert native.returncode == 0 and emulated.returncode == 0, emulated.stderr[-2000:]
        # the emulated CPU was probed as AVX2, and PyTorch's own kernels dispatched at AVX2
        assert json.loads(emulated.stdout)["cpu"] == {"tier": "avx2", "pytorch": "AVX2"}
        assert json.loads(emulated.stdout)["text"] == json.loads(native.stdout)["text"]
        if HAS_SHIPPED and model:
            assert json.loads(json.loads(emulated.stdout)["text"]) == \
                {"name": "John", "lastname": "Smith", "address": "#1 Samuel St."}


def _random_default(tmp_path: Path) -> Path:
    from mixtral.default_model import random_tiny

    model = random_tiny()
    save(model.state_dict(), model.args, tmp_path / "float")
    return tmp_path / "float"
