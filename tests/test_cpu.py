"""The CPU probe (mixtral.cpu): tiers from cpuinfo's feature bits, the MIXTRAL_ISA cap, what
`mixtral info --system` says, and devices that are not there."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from conftest import tiers_up_to_machine

from mixtral import cpu
from mixtral.cli import main

X86 = {"architecture": "x86_64", "avx2": True, "fma3": True, "f16c": True}
AVX512 = {"avx512_f": True, "avx512_bw": True, "avx512_vl": True, "avx512_dq": True}


@pytest.mark.parametrize(("features", "tier"), [
    (X86, "avx2"),  # Zen 3, Haswell, most laptops
    ({**X86, **AVX512}, "avx512"),  # Skylake-X
    ({**X86, **AVX512, "avx512_bf16": True}, "avx512_bf16"),  # Zen 4/5, Sapphire Rapids
    ({**X86, "avx512_f": True}, "avx2"),  # Xeon Phi: F without BW/VL/DQ
    ({**X86, "fma3": False}, "generic"),  # Sandy/Ivy Bridge
    ({"architecture": "aarch64", "avx2": True}, "generic"),  # ARM: x86 bits mean nothing
    ({}, "generic"),
])
def test_tiers_from_feature_bits(features, tier):
    assert cpu.machine_tier(features) == tier


def _ceiling(monkeypatch) -> str:
    """The highest tier this process can take: its CPU's, or lower where PyTorch's dispatch
    started capped (a run with MIXTRAL_ISA set before it began)."""
    monkeypatch.delenv("MIXTRAL_ISA", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    return cpu.probe.__wrapped__().tier


def test_the_cap_lowers_and_never_raises_the_tier(monkeypatch):
    machine = _ceiling(monkeypatch)
    try:
        for cap in cpu.TIERS:
            monkeypatch.setenv("MIXTRAL_ISA", cap)
            cpu.probe.cache_clear()
            c = cpu.probe()
            want = cpu.TIERS[min(cpu.TIERS.index(cap), cpu.TIERS.index(machine))]
            assert (c.tier, c.cap) == (want, cap)
            assert c.onednn_bf16 == c.at_least("avx512")
            assert not c.bf16 or c.tier == "avx512_bf16"
    finally:
        monkeypatch.undo()
        cpu.probe.cache_clear()


def test_a_bad_cap_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("MIXTRAL_ISA", "avx3")
    cpu.probe.cache_clear()
    try:
        with pytest.raises(cpu.IsaError, match="'avx3' is not a tier"):
            cpu.probe()
        assert main(["info", "--system"]) == 2
        assert "MIXTRAL_ISA='avx3' is not a tier; use one of generic, avx2" in \
            capsys.readouterr().err
    finally:
        monkeypatch.undo()
        cpu.probe.cache_clear()


def test_the_cap_reaches_pytorch_unless_set_explicitly(monkeypatch):
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.setenv(name, "")  # so that monkeypatch restores them, set or not
        monkeypatch.delenv(name)
    monkeypatch.setenv("MIXTRAL_ISA", "avx2")
    cpu.cap_torch()
    import os

    assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2"
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    monkeypatch.setenv("MIXTRAL_ISA", "generic")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    cpu.cap_torch()
    assert os.environ["ATEN_CPU_CAPABILITY"] == "avx512"  # the user's own setting wins
    monkeypatch.setenv("MIXTRAL_ISA", "nonsense")
    cpu.cap_torch()  # left for probe() to report, never an error at import


def test_pytorch_and_onednn_caps_set_by_hand_cap_the_tier(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 without MIXTRAL_ISA: oneDNN would refuse bf16 packing, so the
    tier follows it (a process's PyTorch dispatch level counts the same way)."""
    machine = _ceiling(monkeypatch)
    try:
        for value, cap in (("AVX2", "avx2"), ("SSE41", "generic"), ("AVX512_CORE_BF16", None)):
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", value)
            cpu.probe.cache_clear()
            want = machine if cap is None else \
                cpu.TIERS[min(cpu.TIERS.index(cap), cpu.TIERS.index(machine))]
            assert cpu.probe().tier == want, value
    finally:
        monkeypatch.undo()
        cpu.probe.cache_clear()


def test_the_probe_does_not_start_torch():
    """MIXTRAL_ISA must reach PyTorch before it starts, so mixtral/cpu.py and mixtral/__init__
    import torch only inside functions (mixtral/__init__ calls cpu.cap_torch() first)."""
    for name in ("cpu.py", "__init__.py"):
        tree = ast.parse((Path(cpu.__file__).parent / name).read_text())
        top = {a.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import)
               for a in node.names}
        top |= {(node.module or "").split(".")[0] for node in tree.body
                if isinstance(node, ast.ImportFrom)}
        assert "torch" not in top, name


@pytest.mark.slow
@pytest.mark.parametrize("isa", tiers_up_to_machine()[:2], indirect=True)  # generic, avx2
def test_info_system_names_the_tier_and_the_paths(isa, capsys):
    assert main(["info", "--system"]) == 0
    out = capsys.readouterr().out
    assert f"tier          {isa} (capped by MIXTRAL_ISA={isa})" in out
    from mixtral import kernels

    assert ("PyTorch's only" in out) == (not kernels.available())
    assert (isa == "generic") <= ("PyTorch's only" in out)
    assert main(["info", "--system", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"cpu", "tier", "kernels", "fp32", "bf16", "int8/int4"}
    assert main(["info", "mixtral-8x7b", "--system"]) == 0
    assert "46.7B total" in capsys.readouterr().out


@pytest.mark.parametrize(("device", "message"), [
    ("cdua", "'cdua' is not a device; write cpu, cuda or cuda:N"),
    ("vulkan", "vulkan: mixtral runs on cpu or cuda"),
])
def test_devices_that_are_not_there_are_one_line_errors(device, message, capsys):
    assert main(["generate", "--prompt", "hi", "--device", device]) == 2
    err = capsys.readouterr().err
    assert err == f"mixtral generate: error: {message}\n"


def test_cuda_without_cuda_is_a_one_line_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixtral bench: error: cuda: ") and err.count("\n") == 1


@pytest.mark.parametrize("env,first,want", [
    ({}, "mixtral", "10000 None"),  # ours: a short spin (mixtral/threads.py)
    ({"GOMP_SPINCOUNT": "500"}, "mixtral", "500 None"),  # the user's wins
    ({"OMP_WAIT_POLICY": "PASSIVE"}, "mixtral", "None PASSIVE"),
    ({}, "torch", "None None"),  # torch first: its OpenMP has read the environment already
])
def test_openmp_wait_policy_is_set_before_torch_starts(env, first, want):
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = (f"import {first}, mixtral, os; print(os.environ.get('GOMP_SPINCOUNT'), "
            "os.environ.get('OMP_WAIT_POLICY')); from mixtral import cpu; "
            "print(cpu.describe()['openmp'])")
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[0] == want
    assert ("mixtral's default" in out[1]) == (want == "10000 None")


@pytest.mark.parametrize("env,argv,want", [
    ({}, ["generate", "--max-ram", "8GiB"], "8000000"),  # paging: the longer spin
    ({}, ["generate", "--max-ram=8GiB"], "8000000"),
    ({}, ["generate", "--max-r", "8GiB"], "8000000"),  # argparse takes an unambiguous prefix
    ({}, ["generate", "--max-ra=8GiB"], "8000000"),
    ({}, ["generate", "--max-tokens", "8"], "10000"),
    ({}, ["generate", "--prompt", "hi"], "10000"),
    ({"GOMP_SPINCOUNT": "500"}, ["generate", "--max-ram", "8GiB"], "500"),  # the user's wins
    ({"OMP_WAIT_POLICY": "PASSIVE"}, ["generate", "--max-ram", "8GiB"], "None"),
])
def test_paging_commands_spin_across_reads(env, argv, want):
    """A command given --max-ram blocks in a read between computations: its OpenMP threads
    spin ~200 ms (threads.PAGING_SPINCOUNT), set by the CLI before torch starts."""
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = ("import sys, os, mixtral.cli as c; from mixtral import threads\n"
            "try:\n    c.main(sys.argv[1:] + ['--help'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('GOMP_SPINCOUNT'))\n"
            "print(threads.describe())")
    out = subprocess.run([sys.executable, "-c", code, *argv], env={**clean, **env},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[-2] == want
    assert ("paging experts" in out[-1]) == (want == "8000000")
