"""What this CPU can do, asked once: the one place that decides which paths run.

Every choice that depends on the processor — oneDNN's packed bf16 weights, which build of our
kernels (mixtral/csrc/), how PyTorch packs int4 — asks `probe()`, nowhere else. The answer
comes from CPUID as PyTorch's cpuinfo reads it (so emulators and containers report what they
emulate, unlike /proc/cpuinfo text), reduced to a tier:

  avx512_bf16  AVX-512 F/BW/VL/DQ with native bf16 dot products (Zen 4/5, Cooper/Sapphire Lake)
  avx512       AVX-512 F/BW/VL/DQ (Skylake-X, Ice Lake)
  avx2         AVX2 + FMA + F16C (Haswell and later, Zen 1-3: most laptops and desktops)
  generic      anything else, ARM included: PyTorch's own operations alone

`MIXTRAL_ISA=<tier>` caps the tier, so that every tier can be tested on a machine at or above
it. Set before PyTorch starts (i.e. before `import mixtral` or torch), the cap also lowers
PyTorch's own dispatch (`ATEN_CPU_CAPABILITY`) and oneDNN (`ONEDNN_MAX_CPU_ISA`), so that
`MIXTRAL_ISA=avx2` on an AVX-512 machine behaves as an AVX2 machine does; explicit settings of
those two variables win. `mixtral info --system` prints the answer and the paths it chooses.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from mixtral import threads

TIERS = ("generic", "avx2", "avx512", "avx512_bf16")  # ascending
ENV = "MIXTRAL_ISA"
ACTIVATIONS_ENV = "MIXTRAL_ACTIVATIONS"

# What our kernels multiply int8/int4 weights with, by default. On AVX2 the float path is
# compute-bound (widening the weights to fp32 costs more than reading them), so the activations
# are quantized to int8 in blocks of 32 and integer dot products do the work, as llama.cpp does
# (mixtral/csrc/q8.cpp: 1.5-2.7x faster products, ~1e-3 relative error each); AVX-512 streams
# the weights at memory speed in fp32 and keeps the exact activations. MIXTRAL_ACTIVATIONS=
# float|int8 overrides.
_ACTIVATIONS = {"generic": "float", "avx2": "int8", "avx512": "float", "avx512_bf16": "float"}

# what PyTorch and oneDNN are capped to under each tier (see the docstring)
_ATEN = {"generic": "default", "avx2": "avx2", "avx512": "avx512", "avx512_bf16": "avx512"}
_ONEDNN = {"generic": "SSE41", "avx2": "AVX2", "avx512": "AVX512_CORE",
           "avx512_bf16": "AVX512_CORE_BF16"}
_ATEN_RANK = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}  # torch's names for its own tiers


_ATEN_TIER = {"DEFAULT": "generic", "AVX2": "avx2"}  # PyTorch's dispatch level -> at most


def _onednn_tier(value: str, machine: str) -> str:
    """The highest tier a ONEDNN_MAX_CPU_ISA value allows (oneDNN packs bf16 from AVX-512)."""
    value = value.strip().upper()
    if not value or value in ("ALL", "DEFAULT") or value.startswith(("AVX512", "AVX10", "AMX")):
        return machine
    return "avx2" if value.startswith("AVX2") else "generic"


class IsaError(ValueError):
    """MIXTRAL_ISA names no tier, or MIXTRAL_ACTIVATIONS no kind."""


@dataclass(frozen=True)
class Cpu:
    tier: str          # the tier the paths use: the machine's, capped by MIXTRAL_ISA
    machine: str       # the tier the processor has
    cap: str | None    # MIXTRAL_ISA, if set
    arch: str          # x86_64, aarch64, ...
    name: str          # the processor's name as cpuinfo gives it
    bf16: bool         # native bf16 dot products (vdpbf16ps), at this tier
    vnni: bool         # int8 dot products (vpdpbusd), at this tier
    aten: str          # PyTorch's own dispatch tier in this process (DEFAULT/AVX2/AVX512/...)
    activations: str   # "int8" or "float": what int8/int4 weights multiply (see _ACTIVATIONS)

    def at_least(self, tier: str) -> bool:
        return TIERS.index(self.tier) >= TIERS.index(tier)

    @property
    def onednn_bf16(self) -> bool:
        """oneDNN can pack and multiply bf16 weights (it refuses below AVX-512 BW/VL/DQ)."""
        return self.at_least("avx512")


def cap_from_env() -> str | None:
    """The tier MIXTRAL_ISA asks for (None: no cap); IsaError if it names none."""
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return None
    if value not in TIERS:
        raise IsaError(f"{ENV}={value!r} is not a tier; use one of {', '.join(TIERS)}")
    return value


def activations_from_env() -> str | None:
    """What MIXTRAL_ACTIVATIONS asks for (None: the tier's default); IsaError if invalid."""
    value = os.environ.get(ACTIVATIONS_ENV, "").strip().lower()
    if value and value not in ("float", "int8"):
        raise IsaError(f"{ACTIVATIONS_ENV}={value!r}: use float or int8")
    return value or None


def cap_torch() -> None:
    """Carry MIXTRAL_ISA over to PyTorch and oneDNN; only has full effect before torch starts
    (mixtral/__init__.py calls it first). An invalid value is left for probe() to report."""
    try:
        cap = cap_from_env()
    except IsaError:
        return
    if cap is not None and cap != "avx512_bf16":
        os.environ.setdefault("ATEN_CPU_CAPABILITY", _ATEN[cap])
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", _ONEDNN[cap])


def machine_tier(features: dict[str, object]) -> str:
    """A cpuinfo feature dict (torch._C._cpu._get_cpu_capability()) -> the processor's tier."""
    def has(*names: str) -> bool:
        return all(bool(features.get(n)) for n in names)

    if features.get("architecture") not in ("x86_64", "AMD64") or not has("avx2", "fma3", "f16c"):
        return "generic"
    if not has("avx512_f", "avx512_bw", "avx512_vl", "avx512_dq"):
        return "avx2"
    return "avx512_bf16" if has("avx512_bf16") else "avx512"


@functools.cache
def probe() -> Cpu:
    """This process's answer (cached; tests clear it with probe.cache_clear())."""
    import platform

    import torch

    features: dict[str, object] = dict(torch._C._cpu._get_cpu_capability())
    features.setdefault("architecture", platform.machine())
    machine = machine_tier(features)
    cap = cap_from_env()
    aten = torch.backends.cpu.get_cpu_capability()
    # the lowest of: the CPU, MIXTRAL_ISA, and PyTorch's or oneDNN's own caps if set by hand
    tiers = [machine, cap or machine, _ATEN_TIER.get(aten, machine),
             _onednn_tier(os.environ.get("ONEDNN_MAX_CPU_ISA", ""), machine)]
    tier = TIERS[min(TIERS.index(t) for t in tiers)]
    return Cpu(tier=tier, machine=machine, cap=cap, arch=str(features["architecture"]),
               name=str(features.get("cpu_name") or platform.processor() or "unknown"),
               bf16=tier == "avx512_bf16",
               vnni=tier.startswith("avx512") and bool(features.get("avx512_vnni")),
               aten=aten, activations=activations_from_env() or _ACTIVATIONS[tier])


def describe() -> dict[str, str]:
    """The processor's part of `mixtral info --system` (mixtral.fast adds the paths)."""
    c = probe()
    out = {"cpu": f"{c.name} ({c.arch}), tier {c.machine}",
           "tier": c.tier + (f" (capped by {ENV}={c.cap})" if c.cap else ""),
           "bf16 dot": "native (vdpbf16ps)" if c.bf16 else "none: bf16 is widened to fp32",
           "int8 dot": ("VNNI (vpdpbusd)" if c.vnni else
                        "vpmaddubsw" if c.at_least("avx2") else "none"),
           "activations": (f"{c.activations} for int8/int4 weights"
                           + (f" ({ACTIVATIONS_ENV})" if activations_from_env() else "")),
           "pytorch": f"dispatches at {c.aten}",
           "openmp": threads.describe()}
    if _ATEN_RANK.get(c.aten, 2) > _ATEN_RANK.get(_ATEN[c.tier].upper(), 2):
        out["pytorch"] += (f" (it started before {ENV} was read: set it before Python starts "
                           "for PyTorch's own kernels to follow the cap)")
    return out
