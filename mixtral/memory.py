"""How much memory this process can still take, and a check to run before loading weights.

A checkpoint too big for the machine used to end in a raw allocator error or in the kernel's
OOM killer, minutes into the load. The check compares what a load will allocate with the
tightest of the limits that apply: the system's MemAvailable (+ free swap), the cgroup's limit
(containers), and RLIMIT_AS (`ulimit -v`). An unknown limit is no limit: the check refuses only
what is known not to fit. MIXTRAL_SKIP_MEMORY_CHECK=1 skips it (e.g. with overcommitted swap).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable
from pathlib import Path

import torch

from mixtral.checkfile import CheckpointError, TensorEntry

SKIP_ENV = "MIXTRAL_SKIP_MEMORY_CHECK"
_UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a huge number (2**63 rounded to a page)


class NotEnoughMemoryError(CheckpointError):
    pass


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" in cgroup v2: no limit


def _fields(path: Path) -> dict[str, int]:
    """'name value [kB]' lines (/proc/meminfo, memory.stat) -> {name: bytes}."""
    out: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1]) * (1024 if parts[2:3] == ["kB"] else 1)
    return out


def _cgroup_paths() -> dict[str, str]:
    """/proc/self/cgroup -> {"v2": our cgroup v2 path, "v1": our v1 memory cgroup path}."""
    paths = {}
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, rel = line.split(":", 2)
            if controllers == "":
                paths["v2"] = rel
            elif "memory" in controllers.split(","):
                paths["v1"] = rel
    except (OSError, ValueError):
        pass
    return paths


def _cgroup_headroom() -> int | None:
    """The cgroup's limit minus its usage, not counting page cache it can drop."""
    own = _cgroup_paths()
    for version, root, limit_name, usage_name, cache_name in (
            ("v2", "/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
            ("v1", "/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
             "total_inactive_file")):
        # our own folder, or the root when the container's namespace shows only that
        for folder in (Path(root + own.get(version, "/")), Path(root)):
            limit = _read_int(folder / limit_name)
            usage = _read_int(folder / usage_name)
            if limit is None or usage is None:
                continue
            if limit >= _UNLIMITED:
                return None
            cache = _fields(folder / "memory.stat").get(cache_name, 0)
            return max(0, limit - max(0, usage - cache))
    return None


def _address_space_headroom() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    used = _fields(Path("/proc/self/status")).get("VmSize", 0)
    return max(0, soft - used)


def available() -> tuple[int, str] | None:
    """-> (bytes this process can still allocate, which limit says so), or None if unknown."""
    limits = []
    meminfo = _fields(Path("/proc/meminfo"))
    if "MemAvailable" in meminfo:
        limits.append((meminfo["MemAvailable"] + meminfo.get("SwapFree", 0),
                       "MemAvailable + SwapFree in /proc/meminfo"))
    cgroup = _cgroup_headroom()
    if cgroup is not None:
        limits.append((cgroup, "the cgroup's memory limit"))
    address = _address_space_headroom()
    if address is not None:
        limits.append((address, "RLIMIT_AS (ulimit -v)"))
    return min(limits) if limits else None


def check_fits(need: int, what: str, hint: str) -> None:
    """Raise NotEnoughMemoryError if `need` bytes are known not to fit; `what` says what they
    are for, `hint` what to do instead."""
    if os.environ.get(SKIP_ENV) == "1":
        return
    limit = available()
    if limit is None or need <= limit[0]:
        return
    gib = 2**30
    raise NotEnoughMemoryError(
        f"{what} needs {need / gib:.2f} GiB but only {limit[0] / gib:.2f} GiB is available "
        f"({limit[1]}); {hint}, or set {SKIP_ENV}=1 to try anyway")


def load_bytes(entries: Iterable[TensorEntry], dtype: torch.dtype | None) -> int:
    """What loading these tensors allocates: every float tensor in `dtype` (default: its
    own), the others as stored, plus one file tensor read beside its destination (a cast,
    a fused bank split, a stack of experts)."""
    total = largest = 0
    for e in entries:
        numel = 1
        for d in e.shape:
            numel *= d
        stored = numel * e.dtype.itemsize
        total += numel * dtype.itemsize if dtype and e.dtype.is_floating_point else stored
        largest = max(largest, stored)
    return total + largest
