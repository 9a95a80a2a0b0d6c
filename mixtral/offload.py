"""Run a model bigger than RAM: attention, router, norms and embeddings resident; experts paged
in from a quantized checkpoint on demand, into a cache of hot experts under a RAM budget (which
expert it evicts: mixtral.cache_policy).

Each expert of each layer is a contiguous slice of its bank in the safetensors file, so paging
one in is three reads (w1, w3, w2 and their scales) straight into fresh buffers; int4 experts
are packed for this CPU's kernel at their first call (mixtral.quant.int4).
Experts run where they were read; nothing else is copied. Pages read are dropped from the page
cache (POSIX_FADV_DONTNEED), so the file is not held twice.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

from mixtral import cache_policy
from mixtral.checkpoint import CheckpointError, CheckpointInfo, inspect, quantized_reader, reader
from mixtral.configs import parse_dtype
from mixtral.formats import is_quantized_weight, portable_names
from mixtral.memory import check_fits, load_bytes
from mixtral.model import ExpertBank, Transformer
from mixtral.quant import Format, QuantExperts, apply, get
from mixtral.sizes import parse_size

RUNTIME_RESERVE = 1 * 2**30  # Python, PyTorch, activations, KV cache of short contexts
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
DEFAULT_POLICY = "aging"  # chosen on routing traces: benchmarks/cache_policy.py, RESULTS.md


class ExpertStore:
    """Reads single experts out of the expert banks of a quantized checkpoint."""

    def __init__(self, info: CheckpointInfo) -> None:
        assert info.quantization is not None
        self.info, self.bits = info, info.quantization["bits"]
        self.to_portable = get(self.bits).layouts[info.quantization["layout"]]
        self.bytes_read = 0
        self._files: dict[Path, int] = {}

    def read(self, layer: int, expert: int) -> dict[str, tuple[Tensor, Tensor]]:
        out = {}
        for w in ("w1", "w2", "w3"):
            qname, sname = portable_names(f"layers.{layer}.feed_forward.experts.{w}", self.bits)
            out[w] = (self.to_portable(self._slice(qname, expert)), self._slice(sname, expert))
        return out

    def _slice(self, name: str, expert: int) -> Tensor:
        entry = self.info.entries[name]
        shape = entry.shape[1:]
        nbytes = entry.dtype.itemsize
        for d in shape:
            nbytes *= d
        start = entry.start + expert * nbytes
        out = torch.empty(shape, dtype=entry.dtype)
        fd = self._fd(entry.file)
        buf = (ctypes.c_ubyte * nbytes).from_address(out.data_ptr())
        got = os.preadv(fd, [buf], start)
        if got != nbytes:
            raise CheckpointError(f"{entry.file}: short read of {name} expert {expert}")
        os.posix_fadvise(fd, start, nbytes, os.POSIX_FADV_DONTNEED)
        self.bytes_read += nbytes
        return out

    def _fd(self, path: Path) -> int:
        if path not in self._files:
            self._files[path] = os.open(path, os.O_RDONLY)
            # no readahead: an expert is read whole, and what lies past it is another expert
            # (measured: readahead made the disk read 17-31 % more than the experts' bytes)
            os.posix_fadvise(self._files[path], 0, 0, os.POSIX_FADV_RANDOM)
        return self._files[path]


class ExpertCache:
    """The hot experts of all layers under a byte budget; `policy` (mixtral.cache_policy)
    names the one to evict. `trace`, when a list, receives every use: (layer, expert)."""

    def __init__(self, store: ExpertStore, budget: int, fmt: Format, group_size: int,
                 dtype: torch.dtype, policy: str = DEFAULT_POLICY) -> None:
        self.store, self.budget = store, budget
        self.fmt, self.group_size, self.dtype = fmt, group_size, dtype
        # what each paged-in expert becomes: mixtral.fast swaps in its own form (our kernels)
        self.swap: Callable[[nn.Module], nn.Module] = lambda module: module
        self.policy = cache_policy.make(policy)
        self._held: dict[tuple[int, int], tuple[nn.Module, int]] = {}
        self.used = 0
        self.hits = self.misses = 0
        self.trace: list[tuple[int, int]] | None = None
        self._lock = threading.Lock()

    def get(self, layer: int, expert: int) -> nn.Module:
        key = (layer, expert)
        with self._lock:
            if self.trace is not None:
                self.trace.append(key)
            self.policy.touch(key)
            if key in self._held:
                self.hits += 1
                return self._held[key][0]
            self.misses += 1
        banks = {w: (q[None], s[None]) for w, (q, s) in self.store.read(layer, expert).items()}
        size = sum(q.numel() * q.element_size() + s.numel() * s.element_size()
                   for q, s in banks.values())
        module = self.swap(QuantExperts(banks, self.fmt, self.group_size, self.dtype))
        with self._lock:
            if key in self._held:  # another thread read it meanwhile
                return self._held[key][0]
            while self._held and self.used + size > self.budget:
                _, freed = self._held.pop(self.policy.victim(self._held))
                self.used -= freed
            self._held[key] = (module, size)
            self.used += size
        return module


class OffloadedExperts(ExpertBank):
    """One layer's experts, fetched through the shared cache (each a one-expert bank)."""

    def __init__(self, layer: int, cache: ExpertCache, num_experts: int) -> None:
        super().__init__()
        self.layer, self.cache, self.num_experts = layer, cache, num_experts

    def expert(self, e: int, x: Tensor) -> Tensor:
        return cast(Callable[[int, Tensor], Tensor], self.cache.get(self.layer, e).expert)(0, x)


def plan(info: CheckpointInfo, max_ram: int, kv_cache_bytes: int = 0) -> tuple[int, int]:
    """-> (resident bytes, bytes left for experts); ValueError when the budget cannot work.
    `kv_cache_bytes`: what the caller's KV cache will take, beyond the runtime reserve."""
    resident = sum(e.dtype.itemsize * _numel(e.shape) for name, e in info.entries.items()
                   if ".experts." not in name)
    expert_bytes = sum(e.dtype.itemsize * _numel(e.shape) for name, e in info.entries.items()
                       if ".experts." in name) // (info.args.n_layers * info.args.num_experts)
    left = max_ram - resident - RUNTIME_RESERVE - kv_cache_bytes
    need = info.args.num_experts_per_tok * expert_bytes
    if left < need:
        gib = 2**30
        raise ValueError(
            f"--max-ram {max_ram / gib:.1f} GiB is too small for {info.path}: the resident part "
            f"(attention, embeddings, router, norms: {resident / gib:.2f} GiB) + runtime "
            f"{RUNTIME_RESERVE / gib:.1f} GiB + KV cache {kv_cache_bytes / gib:.2f} GiB + one "
            f"token's {info.args.num_experts_per_tok} experts ({need / gib:.2f} GiB) need "
            f"{(resident + RUNTIME_RESERVE + kv_cache_bytes + need) / gib:.2f} GiB")
    return resident, left


def load_offloaded(path: str | os.PathLike, max_ram: int | str,
                   dtype: torch.dtype | str | None = None,
                   kv_cache_bytes: int = 0, policy: str = DEFAULT_POLICY) -> Transformer:
    """A quantized checkpoint whose experts stay on disk until used (CPU); `max_ram` covers
    the resident weights, the experts cache, a runtime reserve and `kv_cache_bytes`; `policy`:
    the experts cache's (mixtral.cache_policy.POLICIES)."""
    info = inspect(path)
    if info.quantization is None:
        raise CheckpointError(f"{path}: offloading reads quantized experts; make such a copy "
                              "with `mixtral quantize SRC DST --bits 4`")
    budget = parse_size(max_ram, "--max-ram")
    cache_policy.make(policy)  # a bad name fails here, before anything loads
    map_large_blocks()
    _, left = plan(info, budget, kv_cache_bytes)
    quant = info.quantization
    target = parse_dtype(dtype) or info.dtype
    # the budget bounds what this load takes; a model smaller than it takes only its own size
    check_fits(min(budget, load_bytes(info.entries.values(), target) + kv_cache_bytes),
               f"{path} with --max-ram {budget / 2**30:.2f} GiB", "lower --max-ram")
    with torch.device("meta"):
        model = Transformer(info.args)
    read = reader(info)
    floats = {name: read(name).to(target) for name in model.state_dict()
              if not is_quantized_weight(name)}
    model.load_state_dict(floats, strict=False, assign=True)
    store = ExpertStore(info)
    cache = ExpertCache(store, left, get(quant["bits"]), quant["group_size"], target, policy)
    model = apply(model, quantized_reader(info), quant["bits"], quant["group_size"], target, "cpu",
                  experts=lambda layer: OffloadedExperts(layer, cache, info.args.num_experts))
    model.expert_cache = cache  # type: ignore[assignment]  # for reports (hits, bytes read)
    return model.eval()


def map_large_blocks(threshold: int = 2**20) -> None:
    """Have glibc map every block over `threshold` on its own and unmap it when freed. By
    default it raises its threshold (up to 32 MB) as large blocks are freed, so an expert's
    pieces (~29 MB each in Mixtral) come to live in heaps it rarely gives back, and evicted
    experts leave holes: measured under an 8 GiB cgroup, 8.6 GiB anonymous memory at an OOM
    kill, against a steady 7.3 GiB with the threshold fixed (benchmarks/offload.py)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold)


def drop_page_cache(path: str | os.PathLike) -> None:
    """Ask the kernel to forget the checkpoint's cached pages (the clean ones), so that what a
    measured run does not hold itself comes from the disk: pages cached before a memory cgroup
    was joined are charged outside it and would serve its reads from RAM (bench --max-ram)."""
    for file in {e.file for e in inspect(path).entries.values()}:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
