"""Our own CPU kernels (mixtral/csrc/): weight-only int8/int4 matrix-vector products and a
decoding step's MoE on them (lowbit.cpp), and one fused decoding step of attention
(attention.cpp).

For the one row of activations that decoding has, PyTorch's low-bit CPU kernels stream the
weights at 26-38 GB/s on this project's 2-core machine and ours at 36-58 GB/s; fusing a step's
attention and MoE saves ~35 small operations each per layer (benchmarks/RESULTS.md). The
sources are compiled for this machine (-march=native) on first use, like torch.compile's C++
kernels, into PyTorch's extension cache (~5 s, once per CPU type). They are AVX-512 code: on
CPUs without it (AVX2 laptops, ARM), without a compiler, or with MIXTRAL_KERNELS=0,
`available()` is False and the fast modules keep PyTorch's operations.

Layouts (see the C++ file): int8 rows [N, K] with fp32 scales [N]; int4 rows [N, K/2] where
each 64 columns are 32 bytes (column i in the low nibble, i + 32 in the high one) and
sz [N, K/group, 2] = (scale, offset) in fp32 (group % 64 == 0), the weight being
q * scale + offset.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from mixtral import cpu

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("lowbit.cpp", "attention.cpp")]


def why_not() -> str:
    """Why the kernels are not used here ('' when they are)."""
    if os.environ.get("MIXTRAL_KERNELS", "1") == "0":
        return "MIXTRAL_KERNELS=0"
    tier = cpu.probe().tier
    if not cpu.probe().at_least("avx512"):
        return f"no build for the {tier} tier"
    return "" if available() else "the build failed"


def build_dir() -> str:
    from torch.utils import cpp_extension

    return cpp_extension._get_build_directory(f"mixtral_kernels_{_machine_tag()}", False)


@functools.cache
def available() -> bool:
    """Build (once per machine and source version) and load the kernels; False if impossible."""
    if os.environ.get("MIXTRAL_KERNELS", "1") == "0" or not cpu.probe().at_least("avx512"):
        return False
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(name=f"mixtral_kernels_{_machine_tag()}",
                           sources=[str(p) for p in SOURCES],
                           extra_cflags=["-O3", "-march=native", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], is_python_module=False)
        return hasattr(torch.ops.mixtral, "decode_attention")
    except Exception as e:  # no compiler, no ninja: PyTorch's kernels still work
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        warnings.warn(f"mixtral: could not build the CPU kernels in {SOURCES[0].parent} "
                      f"({first[:300]}); using PyTorch's, which decode int8/int4 ~1.4x slower. "
                      "Install a C++ compiler (g++) and the `ninja` package, or set "
                      "MIXTRAL_KERNELS=0 to silence this.", stacklevel=2)
        return False


@functools.cache
def _cpu_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""


def _machine_tag() -> str:
    """Which instruction sets the build is for: -march=native code must not be loaded on
    another CPU (a cache directory shared between machines would crash it), so each CPU
    feature set gets its own build."""
    return hashlib.sha1(_cpu_flags().encode()).hexdigest()[:10]


def int8_mv(x: Tensor, w: Tensor, scales: Tensor) -> Tensor:
    """x [M, K] @ (w int8 [N, K] * scales fp32 [N, 1]).T -> [M, N]; x fp32 or bf16, y in
    x's dtype, fp32 arithmetic."""
    return torch.ops.mixtral.int8_mv(x, w, scales)


def int4_mv(x: Tensor, w: Tensor, sz: Tensor, group: int) -> Tensor:
    """x [M, K] @ W.T for the int4 W (our layout) -> [M, N], dtypes as int8_mv."""
    return torch.ops.mixtral.int4_mv(x, w, sz, group)


def moe_decode(x: Tensor, chosen: Tensor, weights: Tensor, w13: Tensor, s13: Tensor,
               w2: Tensor, s2: Tensor, bits: int, group: int) -> Tensor:
    """A decoding step's MoE on quantized expert banks (csrc/lowbit.cpp): x [M, D], chosen
    and weights [M, k] -> sum over each row's experts (ascending) of weight * w2(silu(gate) *
    up); w13 [E, 2F, ...] and w2 [E, D, ...] in int8_mv's (bits 8) or int4_mv's (bits 4)
    layout, s13/s2 their scales."""
    return torch.ops.mixtral.moe_decode(x, chosen, weights, w13, s13, w2, s2, bits, group)


def decode_attention(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                     rows: Tensor, positions: Tensor, mask: Tensor | None, span: int,
                     n_heads: int, n_kv_heads: int) -> Tensor:
    """One decoding step of attention (csrc/attention.cpp): RoPE on the step's query and key,
    key and value written at `positions` into cache rows `rows`, each query head attending
    over positions 0..span-1 (where `mask` [B, span] allows). qkv [B, (H+2K)*A], cos/sin
    [B, A/2] fp32, caches [R, K, S, A] -> [B, H*A]."""
    return torch.ops.mixtral.decode_attention(qkv, cos, sin, k_cache, v_cache, rows, positions,
                                              mask, span, n_heads, n_kv_heads)


# --- int4 layout ---------------------------------------------------------------------------------

def int4_pack(q: Tensor) -> Tensor:
    """Values 0..15 [N, K] (any integer dtype) -> our layout, uint8 [N, K/2]."""
    N, K = q.shape
    q = q.to(torch.uint8).view(N, K // 64, 2, 32)  # [N, chunk, half, i]
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(N, K // 2).contiguous()


def int4_unpack(w: Tensor) -> Tensor:
    """Our layout uint8 [N, K/2] -> values 0..15 uint8 [N, K]."""
    N, half = w.shape
    b = w.view(N, half // 32, 1, 32)
    return torch.cat([b & 15, b >> 4], dim=2).reshape(N, half * 2)


def int4_offsets(scale: Tensor, zero: Tensor) -> Tensor:
    """Portable (scale, zero) with w = (q - 8) * scale + zero -> our sz [..., 2] fp32 with
    w = q * scale + offset."""
    scale, zero = scale.float(), zero.float()
    return torch.stack([scale, zero - 8 * scale], dim=-1).contiguous()


def int8_dequantize(w: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """The float weight [N, K] in `dtype` (fp32/bf16) that the int8 form stands for (long
    prompts multiply by it with the float GEMM). It lives in a per-thread scratch buffer,
    valid until this thread's next call: use it at once."""
    return torch.ops.mixtral.int8_dequant(w, scales, _scratch(w.shape[0], w.shape[1], dtype))


def int4_dequantize(w: Tensor, sz: Tensor, group: int, dtype: torch.dtype) -> Tensor:
    """The same for our int4 form."""
    return torch.ops.mixtral.int4_dequant(w, sz, group,
                                          _scratch(w.shape[0], w.shape[1] * 2, dtype))


_local = threading.local()


def _scratch(n: int, k: int, dtype: torch.dtype) -> Tensor:
    """A reused [n, k] buffer: a fresh one each call costs more in page faults than the
    dequantization itself (~3 ms for a 14 MB weight)."""
    buffers: dict[torch.dtype, Tensor] = _local.__dict__.setdefault("buffers", {})
    if dtype not in buffers or buffers[dtype].numel() < n * k:
        buffers[dtype] = torch.empty(n * k, dtype=dtype)
    return buffers[dtype][:n * k].view(n, k)
