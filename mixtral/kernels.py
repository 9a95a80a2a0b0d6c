"""Our own CPU kernels (mixtral/csrc/): weight-only int8/int4 and bf16 matrix-vector products
(lowbit.cpp, bf16.cpp; int8/int4 also on int8-quantized activations with integer dot products,
q8.cpp, where mixtral.cpu chooses it, prompts included), a decoding step's MoE on them
(moe.cpp, routing included), dequantization for prompts (dequant.cpp), int4 scales converted
at load (int4_scales.cpp), one fused decoding step of attention (attention.cpp) and RMSNorm
(norm.cpp).

For the one row of activations that decoding has, PyTorch's low-bit CPU kernels stream the
weights at 25-32 GB/s on this project's 2-core machine (int4 at 9 on AVX2) and ours at 34-47
GB/s (int4 at 20-24 on AVX2, csrc/lowbit.cpp); fusing a step's attention and MoE saves ~35
small operations each per layer (benchmarks/RESULTS.md). The
sources are compiled on first use, like torch.compile's C++ kernels, into PyTorch's extension
cache (~5-10 s, once per tier and source version): one build per x86 tier of `cpu.probe()`
(avx2, avx512, avx512_bf16), with that tier's explicit instruction-set flags rather than
-march=native, so that a build serves every CPU of its tier (csrc/simd.h). Each tier's build
registers its ops under its own namespace (torch.ops.mixtral_<tier>), so that several can be
loaded in one process (the tests compare them). On the generic tier (ARM, x86 without AVX2),
without a compiler, or with MIXTRAL_KERNELS=0, `available()` is False and the fast modules keep
PyTorch's operations.

Layouts (see the C++ file): int8 rows [N, K] with fp32 scales [N]; int4 rows [N, K/2] as the
checkpoint stores them (mixtral.quant.int4's portable bytes: the same file means the same on
every machine, and nothing is repacked at load or when an offloaded expert pages in) with
sz [N, K/group, 2] = (scale, offset) in fp32 (group % 64 == 0), the weight being
q * scale + offset; bf16 rows [N, K] as nn.Linear holds them.
"""

from __future__ import annotations

import contextlib
import fcntl  # the kernels are x86 Linux builds; fcntl is there
import functools
import hashlib
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mixtral import cpu

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("lowbit.cpp", "bf16.cpp", "q8.cpp", "moe.cpp",
                                           "dequant.cpp", "attention.cpp", "int4_scales.cpp",
                                           "norm.cpp")]
HEADERS = sorted(CSRC.glob("*.h"))

# Each tier's instruction sets, spelled out: the build must run on every CPU of the tier.
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
_AVX512 = [*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
FLAGS = {"avx2": _AVX2, "avx512": _AVX512, "avx512_bf16": [*_AVX512, "-mavx512bf16"]}


def why_not() -> str:
    """Why the kernels are not used here ('' when they are)."""
    if os.environ.get("MIXTRAL_KERNELS", "1") == "0":
        return "MIXTRAL_KERNELS=0"
    tier = cpu.probe().tier
    if tier not in FLAGS:
        return f"no build for the {tier} tier"
    return "" if available() else "the build failed"


def _name(tier: str) -> str:
    return f"mixtral_kernels_{tier}"


def build_dir(tier: str | None = None) -> str:
    """Where the build for `tier` (default: this process's) lives."""
    from torch.utils import cpp_extension

    return cpp_extension._get_build_directory(_name(tier or cpu.probe().tier), False)


def unavailable_reason() -> str | None:
    """Why this process has no kernels (None when it has them): for messages and test skips."""
    if os.environ.get("MIXTRAL_KERNELS", "1") == "0":
        return "MIXTRAL_KERNELS=0 turns the kernels off"
    tier = cpu.probe().tier
    if tier not in FLAGS:
        return f"no kernels at the {tier} tier (PyTorch's operations only)"
    if not available():
        return "the kernels could not be built here (a C++ compiler and ninja are needed)"
    return None


@functools.cache
def available() -> bool:
    """Build (once per tier and source version) and load the kernels for this process's tier;
    False, quietly, where there are none (generic tier, MIXTRAL_KERNELS=0), False with a
    warning where the build fails."""
    tier = cpu.probe().tier
    if os.environ.get("MIXTRAL_KERNELS", "1") == "0" or tier not in FLAGS:
        return False
    try:
        ops(tier)
        return True
    except Exception as e:  # no compiler, no ninja: PyTorch's kernels still work
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        warnings.warn(f"mixtral: could not build the CPU kernels in {CSRC} "
                      f"({first[:300]}); using PyTorch's, which decode int8/int4 ~1.4x slower. "
                      "Install a C++ compiler (g++) and the `ninja` package, or set "
                      "MIXTRAL_KERNELS=0 to silence this.", stacklevel=2)
        return False


@functools.cache
def ops(tier: str) -> Any:
    """The op namespace of `tier`'s build (torch.ops.mixtral_<tier>), built and loaded on first
    use; raises if the tier has no build, exceeds this CPU, or the build fails. The public
    functions below use this process's tier; tests use it to compare tiers in one process."""
    if tier not in FLAGS:
        raise ValueError(f"no kernels for the {tier} tier (tiers with kernels: "
                         f"{', '.join(FLAGS)})")
    machine = cpu.probe().machine
    if cpu.TIERS.index(tier) > cpu.TIERS.index(machine):
        raise ValueError(f"this CPU ({machine}) cannot run the {tier} kernels")
    from torch.utils import cpp_extension

    namespace = f"mixtral_{tier}"
    with build_lock(build_dir(tier)):
        cpp_extension.load(name=_name(tier), sources=[str(p) for p in SOURCES],
                           extra_cflags=["-O3", *FLAGS[tier], f"-DMIXTRAL_NS={namespace}",
                                         f"-DMIXTRAL_HEADERS={_headers_hash()}", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], extra_include_paths=[str(CSRC)],
                           is_python_module=False)
    namespace_ops = getattr(torch.ops, namespace)
    if not hasattr(namespace_ops, "decode_attention"):
        raise RuntimeError(f"the {tier} build registered no ops in torch.ops.{namespace}")
    return namespace_ops


def _headers_hash() -> str:
    """The headers' contents, as a build flag: PyTorch rebuilds when the sources or the flags
    change, and does not read the headers they include."""
    return hashlib.sha256(b"".join(p.read_bytes() for p in HEADERS)).hexdigest()[:16]


@contextlib.contextmanager
def build_lock(directory: str) -> Iterator[None]:
    """Only one process builds or loads a tier's kernels at a time, under an OS lock (flock)
    that dies with its holder. PyTorch's own lock is a plain file: a build killed midway
    (Ctrl-C, a test timeout) left it behind and every later process waited on it. A process
    holding our lock knows any such file is a dead builder's, and removes it at once."""
    os.makedirs(directory, exist_ok=True)
    with open(Path(directory) / "build.flock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # waits only for a live builder
        try:
            (Path(directory) / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _here() -> Any:
    """This process's tier's ops (both lookups are cached: ~0.1 us a call)."""
    return ops(cpu.probe().tier)


def int8_mv(x: Tensor, w: Tensor, scales: Tensor, qx: bool = False) -> Tensor:
    """x [M, K] @ (w int8 [N, K] * scales fp32 [N, 1]).T -> [M, N]; x fp32 or bf16, y in
    x's dtype, fp32 arithmetic; with qx, x is first quantized to int8 in blocks of 32 columns
    for integer dot products (csrc/q8.cpp; where K % 32 == 0). Every product here also takes
    x [..., K] (a decoding step's [B, 1, K]) and gives [..., N]."""
    return _here().int8_mv(x, w, scales, qx)


def int4_mv(x: Tensor, w: Tensor, sz: Tensor, group: int, qx: bool = False) -> Tensor:
    """x [M, K] @ W.T for the int4 W (portable bytes, our sz) -> [M, N], dtypes and qx as
    int8_mv (x's blocks of 32 being the odd or the even columns of 64, as the kernel reads
    them)."""
    return _here().int4_mv(x, w, sz, group, qx)


def bf16_mv(x: Tensor, w: Tensor) -> Tensor:
    """x [M, K] @ w.T for a bf16 w [N, K] (an nn.Linear weight) -> [M, N]; x fp32 or bf16, y in
    x's dtype, fp32 arithmetic. For decoding where oneDNN cannot pack bf16 weights (AVX2)."""
    return _here().bf16_mv(x, w)


def moe_decode(x: Tensor, chosen: Tensor, weights: Tensor, w13: Tensor, s13: Tensor,
               w2: Tensor, s2: Tensor, bits: int, group: int, qx: bool = False) -> Tensor:
    """A decoding step's MoE on quantized or bf16 expert banks (csrc/moe.cpp): x [M, D],
    chosen and weights [M, k] -> sum over each row's experts (ascending) of weight *
    w2(silu(gate) * up); w13 [E, 2F, ...] and w2 [E, D, ...] in int8_mv's (bits 8), int4_mv's
    (bits 4) or bf16_mv's (bits 16) layout, s13/s2 their scales (unused for bits 16); qx as
    int8_mv's (bits 8 and 4)."""
    return _here().moe_decode(x, chosen, weights, w13, s13, w2, s2, bits, group, qx)


def moe_route(x: Tensor, logits: Tensor, top_k: int, w13: Tensor, s13: Tensor, w2: Tensor,
              s2: Tensor, bits: int, group: int, qx: bool = False) -> Tensor:
    """model.route's routing of x [..., D] by its router logits [..., E] (the same ATen
    operations, so the same experts and weights), then moe_decode -> [..., D]."""
    return _here().moe_route(x, logits, top_k, w13, s13, w2, s2, bits, group, qx)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """model.RMSNorm of x [..., D] (fp32 or bf16) with weight [D] in x's dtype, as one op
    (csrc/norm.cpp), bit for bit: the mean of squares is PyTorch's own, the rest elementwise."""
    return _here().rms_norm(x, weight, eps)


def decode_attention(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                     rows: Tensor, positions: Tensor, mask: Tensor | None, span: int,
                     n_heads: int, n_kv_heads: int) -> Tensor:
    """One decoding step of attention (csrc/attention.cpp): RoPE on the step's query and key,
    key and value written at `positions` into cache rows `rows`, each query head attending
    over positions 0..span-1 (where `mask` [B, span] allows). qkv [B, (H+2K)*A], cos/sin
    [B, A/2] fp32, caches [R, K, S, A] -> [B, H*A]; or as the model holds a step, no reshape
    needed: qkv [B, 1, (H+2K)*A] -> [B, 1, H*A], cos/sin [B, 1, A/2], positions [B, 1], mask
    [B, 1, 1, span]."""
    return _here().decode_attention(qkv, cos, sin, k_cache, v_cache, rows, positions, mask,
                                    span, n_heads, n_kv_heads)


# --- int4 scales (the bytes need no conversion: the kernels read the portable ones) -------------

def int4_scales(scales_and_zeros: Tensor, dtype: torch.dtype) -> Tensor:
    """The file's scales_and_zeros [..., K/g, N, 2] -> our sz [..., N, K/g, 2] fp32 in one
    pass (csrc/int4_scales.cpp), each value first rounded to `dtype` (fp32/bf16/fp16) as
    Int4Linear holds them: int4_offsets of those, transposed."""
    return _here().int4_scales(scales_and_zeros, dtype)


def int4_scales_(scales_and_zeros: Tensor, dtype: torch.dtype) -> Tensor:
    """int4_scales in place, for contiguous fp32 scales nothing else holds (a paged-in
    expert's): the result is a view of their storage, no fresh memory at each miss."""
    _here().int4_scales_(scales_and_zeros, dtype)
    *lead, groups, n, two = scales_and_zeros.shape
    return scales_and_zeros.view(*lead, n, groups, two)


def int4_offsets(scale: Tensor, zero: Tensor) -> Tensor:
    """Portable (scale, zero) with w = (q - 8) * scale + zero -> our sz [..., 2] fp32 with
    w = q * scale + offset."""
    scale, zero = scale.float(), zero.float()
    return torch.stack([scale, zero - 8 * scale], dim=-1).contiguous()


def int8_dequantize(w: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """The float weight [N, K] in `dtype` (fp32/bf16) that the int8 form stands for (long
    prompts multiply by it with the float GEMM). It lives in a per-thread scratch buffer,
    valid until this thread's next call: use it at once."""
    return _here().int8_dequant(w, scales, _scratch(w.shape[0], w.shape[1], dtype))


def int4_dequantize(w: Tensor, sz: Tensor, group: int, dtype: torch.dtype) -> Tensor:
    """The same for our int4 form (portable bytes, our sz)."""
    return _here().int4_dequant(w, sz, group,
                                  _scratch(w.shape[0], w.shape[1] * 2, dtype))


_local = threading.local()


def _scratch(n: int, k: int, dtype: torch.dtype) -> Tensor:
    """A reused [n, k] buffer: a fresh one each call costs more in page faults than the
    dequantization itself (~3 ms for a 14 MB weight)."""
    buffers: dict[torch.dtype, Tensor] = _local.__dict__.setdefault("buffers", {})
    if dtype not in buffers or buffers[dtype].numel() < n * k:
        buffers[dtype] = torch.empty(n * k, dtype=dtype)
    return buffers[dtype][:n * k].view(n, k)
