"""Single experts read out of a quantized checkpoint's expert banks, for the offloaded-experts
cache (mixtral.offload): each slice straight into the buffer it will run from, with O_DIRECT
where the file system has it, and the weights' buffers reused from evicted experts.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from pathlib import Path

import torch
from torch import Tensor

from mixtral.checkpoint import CheckpointError, CheckpointInfo
from mixtral.formats import portable_names
from mixtral.prefetch import Profile
from mixtral.quant import get

Stored = dict[str, tuple[Tensor, Tensor]]  # an expert as read: (weight, scales) by matrix


class ExpertStore:
    """Reads single experts out of the expert banks of a quantized checkpoint.

    `direct` (the default where the file system has it): with O_DIRECT, from the disk straight
    into the expert's own buffer, bypassing the page cache: no copy out of it, no pages to
    drop, and under a memory limit that counts the page cache no reclaim to make room for
    them. O_DIRECT wants the file offset, the length and the buffer aligned (ALIGN), so each
    slice is read as its aligned window and the tensor is a view into it (< 2 ALIGN spare).
    Where the file system refuses O_DIRECT (tmpfs, some network ones), reads go through the
    page cache, dropped after each read. An expert's six slices (three weights and their
    scales) share one buffer, which the cache hands back (`recycle`) when it evicts an expert
    nothing is using: at a small budget each token would otherwise fault in and zero
    gigabytes of fresh memory."""

    ALIGN = 4096
    POOL = 2  # idle read buffers kept for reuse (within the runtime reserve, not the budget)

    def __init__(self, info: CheckpointInfo, profile: Profile | None = None,
                 direct: bool = True) -> None:
        assert info.quantization is not None
        self.info, self.bits = info, info.quantization["bits"]
        self.to_portable = get(self.bits).layouts[info.quantization["layout"]]
        self.profile = profile or Profile()
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.bytes_read = 0
        self._files: dict[tuple[Path, bool], int | None] = {}
        self._lock = threading.Lock()  # the reader thread and the caller may both read
        slices = [info.entries[n].dtype.itemsize * numel(info.entries[n].shape[1:])
                  for w in ("w1", "w2", "w3")
                  for n in portable_names(f"layers.0.feed_forward.experts.{w}", self.bits)]
        self.expert_bytes = sum(slices)  # one expert's slices, as the file stores them
        # each slice's region of a read buffer (weight, scales, weight...): room for its
        # aligned window, ALIGN-aligned
        self._regions = [-(-n // self.ALIGN) * self.ALIGN + self.ALIGN for n in slices]
        self._pool: list[Tensor] = []
        self.buffers_made = 0

    def read(self, layer: int, expert: int) -> tuple[Stored, Tensor]:
        """The expert's (weight, scales) by matrix name, as the file stores them (the weight
        in the file's layout: `to_portable` converts it), and the one buffer they are all
        views of: `recycle` it once they are dropped, and the next read reuses it. Our
        kernels' packing converts weights and scales where they lie (mixtral.fast.page_in),
        so nothing of the file's stays behind beside them."""
        with self._lock:
            raw = self._pool.pop() if self._pool else None
            self.buffers_made += raw is None
        if raw is None:
            raw = torch.empty(sum(self._regions) + self.ALIGN, dtype=torch.uint8)
        offset = -raw.data_ptr() % self.ALIGN  # the regions start aligned
        out, regions = {}, iter(self._regions)
        for w in ("w1", "w2", "w3"):
            pair = []
            for name in portable_names(f"layers.{layer}.feed_forward.experts.{w}", self.bits):
                size = next(regions)
                pair.append(self._slice(name, expert, raw[offset:offset + size]))
                offset += size
            out[w] = (pair[0], pair[1])
        return out, raw

    def recycle(self, raw: Tensor) -> None:
        """A buffer from `read` whose tensors nothing uses any more: kept for the next read (at
        most POOL of them wait; memory reused is memory not faulted in and zeroed again)."""
        with self._lock:
            if len(self._pool) < self.POOL:
                self._pool.append(raw)

    def _slice(self, name: str, expert: int, region: Tensor) -> Tensor:
        """One slice of an expert read into `region` (uint8, ALIGN-aligned, large enough for
        its aligned window)."""
        entry = self.info.entries[name]
        shape, size = entry.shape[1:], entry.dtype.itemsize
        nbytes = size * numel(shape)
        start = entry.start + expert * nbytes
        # a view of the window must be aligned to the dtype
        what = f"{name} expert {expert}"
        skip = self._direct(entry.file, region, start, nbytes, what) if self.direct \
            and start % size == 0 else None
        if skip is None:  # through the page cache, dropped after
            fd = self._fd(entry.file, direct=False)
            assert fd is not None
            if self._read(fd, region[:nbytes], start) != nbytes:
                raise _short(entry.file, what)
            with self.profile.stage("drop"):
                os.posix_fadvise(fd, start, nbytes, os.POSIX_FADV_DONTNEED)
            skip = 0
        with self._lock:
            self.bytes_read += nbytes
        return region[skip:skip + nbytes].view(entry.dtype).view(shape)

    def _direct(self, path: Path, region: Tensor, start: int, nbytes: int,
                what: str) -> int | None:
        """Read bytes [start, start + nbytes) of `path` with O_DIRECT as their aligned window
        into `region`; -> where they begin in it, or None where the file system refuses."""
        fd = self._fd(path, direct=True)
        if fd is None:
            return None
        lo = start - start % self.ALIGN
        hi = -(-(start + nbytes) // self.ALIGN) * self.ALIGN
        got = self._read(fd, region[:hi - lo], lo)
        if got < 0:  # EINVAL: this file system takes O_DIRECT at open but not for reads
            with self._lock:
                self._files[path, True] = None
            return None
        if got < start - lo + nbytes:
            raise _short(path, what)
        return start - lo

    def _read(self, fd: int, buf: Tensor, offset: int) -> int:
        """Bytes read into `buf` (uint8, contiguous) from `offset`; -1 when the file system
        refused the read (EINVAL: O_DIRECT not supported there)."""
        view = (ctypes.c_ubyte * buf.numel()).from_address(buf.data_ptr())
        with self.profile.stage("read"):
            try:
                return os.preadv(fd, [view], offset)
            except OSError as e:
                if e.errno == errno.EINVAL:
                    return -1
                raise

    def _fd(self, path: Path, direct: bool) -> int | None:
        """The file opened for reads (None: it cannot be opened with O_DIRECT)."""
        with self._lock:
            if (path, direct) not in self._files:
                fd: int | None = None
                try:
                    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
                except OSError as e:
                    if not direct or e.errno != errno.EINVAL:
                        raise
                if fd is not None and not direct:
                    # no readahead: an expert is read whole, and what lies past it is another
                    # expert (measured: readahead made the disk read 17-31 % more than experts)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                self._files[path, direct] = fd
            return self._files[path, direct]


def _short(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: short read of {what}: the file is shorter than its header "
                           "says (cut short, or changed while in use); copy it again")


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
