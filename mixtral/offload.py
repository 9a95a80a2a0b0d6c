"""Run a model bigger than RAM: attention, router, norms and embeddings resident; experts paged
in from a quantized checkpoint on demand, into a cache of hot experts under a RAM budget (which
expert it evicts: mixtral.cache_policy).

Each expert of each layer is a contiguous slice of its bank in the safetensors file, so paging one
in is six reads (w1, w3, w2 and their scales) straight into the buffers they run from (the weights'
one reused from an evicted expert), with O_DIRECT where the file system has it (ExpertStore), so
the page cache does not hold the file a second time. Experts run where they were read: our
kernels read int4 as the file stores it and its scales are converted in place in one pass
(mixtral.fast.page_in); on PyTorch's, it is packed at once (mixtral.quant.int4); nothing else
is copied. With `prefetch` (off by default: DEFAULT_PREFETCH) a background reader reads the
experts the routers foresee while others compute (mixtral.prefetch); the numbers are the same
either way, only when the bytes arrive changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import cast

import torch
from torch import Tensor, nn

from mixtral import cache_policy
from mixtral.checkpoint import CheckpointError, CheckpointInfo, inspect, quantized_reader, reader
from mixtral.configs import parse_dtype
from mixtral.expert_store import ExpertStore, Stored, numel
from mixtral.formats import is_quantized_weight
from mixtral.memory import check_fits, load_bytes
from mixtral.model import ExpertBank, Transformer
from mixtral.prefetch import Foresight, Key, Reader
from mixtral.quant import Format, Pair, QuantExperts, apply, get
from mixtral.quant.int4 import Int4Linear
from mixtral.sizes import parse_size

RUNTIME_RESERVE = 1 * 2**30  # Python, PyTorch, activations, KV cache of short contexts
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
DEFAULT_POLICY = "cycle"  # chosen on routing traces: benchmarks/cache_policy.py, RESULTS.md
# Off by measurement (RESULTS.md, "Threads that stay awake across reads"): on this project's
# KVM guest the disk read 13-18 % slower while both cores computed, so reading ahead gained
# nothing, and with reads on the caller's thread the compute threads can spin across them.
# Where reads cost the CPU nothing (a local NVMe disk) --prefetch may win; not measured here.
DEFAULT_PREFETCH = False
RECENT = 256  # uses: the window of the cache's recent hit rate (4 tokens of Mixtral)


class ExpertCache:
    """The hot experts of all layers under a byte budget; `policy` (mixtral.cache_policy)
    names the one to evict. `trace`, when a list, receives every use: (layer, expert).

    With a `reader` (mixtral.prefetch) experts can also be read ahead (`prefetch`). A read in
    flight holds its bytes of the budget from the start, and a use of it waits for it rather
    than reading twice. The policy sees uses only, so it ranks a read-ahead expert by its
    past uses (one never used ranks last: a wrong guess is the next to go). Read-ahead evicts
    only experts that are not pinned (`pin`: those the current layer chose and those foreseen
    for the next), and is skipped when that is not enough; guesses evict only while the
    recent hit rate is under `guess_evict_below`; a use evicts the policy's victim
    among the unpinned first. Counts: a use is a hit when its expert is in memory, else a
    miss (`waited` of them found it in flight); `prefetched` reads ahead, `prefetch_used` of
    them used before evicted.

    An expert is held as read until its first use packs it for the kernels, on the caller's
    thread: the reader thread then only reads, back to back at the disk's speed, and packing
    runs on the caller's own OpenMP threads instead of a second team beside them (measured
    at 4 GiB: packing on the reader made its work 6.5 s a token against 4.9 s of reads)."""

    def __init__(self, store: ExpertStore, budget: int, fmt: Format, group_size: int,
                 dtype: torch.dtype, policy: str = DEFAULT_POLICY,
                 reader: Reader | None = None) -> None:
        self.store, self.budget, self.reader = store, budget, reader
        self.fmt, self.group_size, self.dtype = fmt, group_size, dtype
        self.profile = store.profile
        # what each paged-in expert becomes, from its pairs as read (portable): PyTorch's
        # modules here; mixtral.fast makes its own form instead (our kernels)
        self.page_in: Callable[[dict[str, Pair]], nn.Module] = self._quant_experts
        self.policy = cache_policy.make(policy)
        self.foresight: Foresight | None = None  # set by load_offloaded with prefetch
        # key -> (the expert as read, or as packed at its first use; its bytes; its buffer,
        # None once the packed expert no longer needs it)
        self._held: dict[Key, tuple[nn.Module | Stored, int, Tensor | None]] = {}
        self._pending: dict[Key, Future[Stored]] = {}
        self._fresh: set[Key] = set()  # read ahead, not used yet
        self.pinned: set[Key] = set()
        self.used = 0  # bytes held and in flight
        self.hits = self.misses = self.waited = 0
        # hits over about the last RECENT uses (a moving average), and when guesses may evict
        self.recent_hit_rate = 1.0
        self.guess_evict_below = 0.5
        self.prefetched = self.prefetch_used = 0
        self.trace: list[Key] | None = None
        self._lock = threading.Lock()

    def get(self, layer: int, expert: int) -> nn.Module:
        key = (layer, expert)
        held: nn.Module | Stored | None = None
        with self._lock:
            if self.trace is not None:
                self.trace.append(key)
            self.policy.touch(key)
            if key in self._fresh:
                self._fresh.discard(key)
                self.prefetch_used += 1
            hit = key in self._held
            self.recent_hit_rate += (hit - self.recent_hit_rate) / RECENT
            if hit:
                self.hits += 1
                held = self._held[key][0]
            else:
                self.misses += 1
        while held is None:
            with self._lock:
                if key in self._held:  # arrived while this use waited for room
                    held = self._held[key][0]
                    break
                pending, mine = self._pending.get(key), False
                if pending is None and self._make_room(demand=True):
                    pending, mine = self._start(key), True
                if pending is not None:
                    self.waited += not mine
                    break
                busy = list(self._pending.values())
            wait(busy, return_when=FIRST_COMPLETED)  # the budget is all reads in flight
        if held is None:
            assert pending is not None
            if mine:
                self._load(key, pending)
            else:  # in flight: wait for it, do not read it again
                with self.profile.stage("wait"):
                    pending.result()
            held = pending.result()
        return self._module(key, held)

    def pin(self, keys: Iterable[Key]) -> None:
        with self._lock:
            self.pinned = set(keys)

    def prefetch(self, keys: Iterable[Key], guesses: bool = False) -> None:
        """Read these experts in the background, in order, those that fit (class docstring).
        `guesses` (the next layer's, foreseen): they may evict only while the cache misses
        more than it hits (`guess_evict_below`), else they are read into free room only."""
        if self.reader is None:
            return
        evict = not guesses or self.recent_hit_rate < self.guess_evict_below
        for key in keys:
            with self._lock:
                if key in self._held or key in self._pending \
                        or not self._make_room(demand=False, evict=evict):
                    continue
                future = self._start(key)
                self._fresh.add(key)
                self.prefetched += 1
            self.reader.submit(self._load, key, future)

    def _make_room(self, demand: bool, evict: bool = True) -> bool:
        """Evict until one more expert fits (the lock held): by the policy among the unpinned,
        then (a use only) among the pinned; False when it cannot (reads in flight fill it, or
        it would have to evict and may not)."""
        size = self.store.expert_bytes
        over = self.used + size - self.budget
        if over > 0 and not evict:
            return False
        unpinned = [k for k in self._held if k not in self.pinned]
        if over > 0 and not demand and len(unpinned) * size < over:
            return False
        while self.used + size > self.budget:
            pool = unpinned or list(self._held)
            if not pool:
                return False
            victim = self.policy.victim(pool)
            if victim in unpinned:
                unpinned.remove(victim)
            held, nbytes, raw = self._held.pop(victim)
            self.used -= nbytes
            self._fresh.discard(victim)
            if raw is not None and sys.getrefcount(held) == 2:  # nobody is computing with it
                self.store.recycle(raw)
            del held
        return True

    def _start(self, key: Key) -> Future[Stored]:
        """The key's read, its bytes held from now (the lock held)."""
        future: Future[Stored] = Future()
        self._pending[key] = future
        self.used += self.store.expert_bytes
        return future

    def _load(self, key: Key, future: Future[Stored]) -> None:
        """Read the expert into `future` (any thread); the outcome, an error included (a
        truncated file), goes to whoever waits on it."""
        try:
            stored, raw = self.store.read(*key)
        except BaseException as e:
            with self._lock:
                del self._pending[key]
                self.used -= self.store.expert_bytes
                self._fresh.discard(key)
            future.set_exception(e)
            return
        with self._lock:
            del self._pending[key]
            self._held[key] = (stored, self.store.expert_bytes, raw)
        future.set_result(stored)

    def _module(self, key: Key, held: nn.Module | Stored) -> nn.Module:
        """The held expert as a module, packed here (the caller's thread) at its first use."""
        if isinstance(held, nn.Module):
            return held
        with self.profile.stage("pack"):  # the file's layout -> the one the kernels read
            module = self.page_in({w: (self.store.to_portable(q), s)
                                   for w, (q, s) in held.items()})
        with self._lock:
            entry = self._held.get(key)
            if entry is not None and entry[0] is held:
                raw = entry[2]
                if raw is not None and not _uses(module, raw):
                    # packed into memory of its own (PyTorch's int4): the read buffer is free
                    self.store.recycle(raw)
                    raw = None
                self._held[key] = (module, entry[1], raw)
        return module


    def _quant_experts(self, banks: dict[str, Pair]) -> nn.Module:
        """An expert on PyTorch's modules, packed now rather than at its first call."""
        module = QuantExperts({w: (q[None], s[None]) for w, (q, s) in banks.items()},
                              self.fmt, self.group_size, self.dtype)
        for m in module.modules():
            if isinstance(m, Int4Linear):
                m.pack()
        return module


class OffloadedExperts(ExpertBank):
    """One layer's experts, fetched through the shared cache (each a one-expert bank)."""

    def __init__(self, layer: int, cache: ExpertCache, num_experts: int) -> None:
        super().__init__()
        self.layer, self.cache, self.num_experts = layer, cache, num_experts

    def expert(self, e: int, x: Tensor) -> Tensor:
        module = self.cache.get(self.layer, e)
        with self.cache.profile.stage("compute"):
            return cast(Callable[[int, Tensor], Tensor], module.expert)(0, x)


def _uses(module: nn.Module, raw: Tensor) -> bool:
    """Whether any tensor of `module` lies in `raw`'s storage: its parameters and buffers, and
    its submodules' plain tensor attributes (our kernels' modules hold theirs so)."""
    storage = raw.untyped_storage().data_ptr()
    attributes = (t for m in module.modules() for t in vars(m).values() if isinstance(t, Tensor))
    return any(t.untyped_storage().data_ptr() == storage
               for t in itertools.chain(module.parameters(), module.buffers(), attributes))


def plan(info: CheckpointInfo, max_ram: int, kv_cache_bytes: int = 0) -> tuple[int, int]:
    """-> (resident bytes, bytes left for experts); ValueError when the budget cannot work.
    `kv_cache_bytes`: what the caller's KV cache will take, beyond the runtime reserve."""
    resident = sum(e.dtype.itemsize * numel(e.shape) for name, e in info.entries.items()
                   if ".experts." not in name)
    expert_bytes = sum(e.dtype.itemsize * numel(e.shape) for name, e in info.entries.items()
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
                   kv_cache_bytes: int = 0, policy: str = DEFAULT_POLICY,
                   prefetch: bool | None = None) -> Transformer:
    """A quantized checkpoint whose experts stay on disk until used (CPU); `max_ram` covers
    the resident weights, the experts cache, a runtime reserve and `kv_cache_bytes`; `policy`:
    the experts cache's (mixtral.cache_policy.POLICIES); `prefetch`: read the experts the
    routers foresee in a background thread (mixtral.prefetch), False: only when used (None:
    DEFAULT_PREFETCH)."""
    prefetch = DEFAULT_PREFETCH if prefetch is None else prefetch
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
    cache = ExpertCache(store, left, get(quant["bits"]), quant["group_size"], target, policy,
                        Reader() if prefetch else None)
    model = apply(model, quantized_reader(info), quant["bits"], quant["group_size"], target, "cpu",
                  experts=lambda layer: OffloadedExperts(layer, cache, info.args.num_experts))
    if prefetch:
        cache.foresight = Foresight(model, cache)
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
