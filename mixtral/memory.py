"""How much memory this process can still take, and a check to run before loading weights.

A checkpoint too big for the machine used to end in a raw allocator error or in the kernel's
OOM killer, minutes into the load. The check compares what a load will allocate with the
tightest of the limits that apply: the system's MemAvailable (+ free swap), the memory limits of
this process's cgroup and its ancestors (containers, systemd slices, bench --max-ram's cgroup),
and RLIMIT_AS (`ulimit -v`). Page cache that the kernel can drop (clean file pages) counts as
available everywhere: a checkpoint's own pages, just read, would otherwise refuse its load.
An unknown limit is no limit: the check refuses only what is known not to fit.
MIXTRAL_SKIP_MEMORY_CHECK=1 skips it (e.g. with overcommitted swap).
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
PROC = Path("/proc")
CGROUPS = Path("/sys/fs/cgroup")  # v2's mount, or v1's folder of per-controller mounts


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


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """/proc/self/cgroup -> {"v2": our cgroup v2 path, "v1": our v1 memory cgroup path}."""
    paths = {}
    try:
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, rel = line.split(":", 2)
            if controllers == "":
                paths["v2"] = rel
            elif "memory" in controllers.split(","):
                paths["v1"] = rel
    except (OSError, ValueError):
        pass
    return paths


# per version: its hierarchy under the cgroup mount, limit and usage files, and the memory.stat
# keys of the file cache (active, inactive) and of the part of it not clean (dirty, writeback)
_HIERARCHIES = (
    ("v2", "", "memory.max", "memory.current",
     ("active_file", "inactive_file"), ("file_dirty", "file_writeback")),
    ("v1", "memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
     ("total_active_file", "total_inactive_file"), ("total_dirty", "total_writeback")))


def _cgroup_headroom(proc: Path, cgroups: Path) -> tuple[int, str] | None:
    """The least headroom of this process's memory cgroup and of each of its ancestors (a limit
    binds its whole subtree): limit minus usage, where usage leaves out the clean file cache
    (active and inactive alike: the kernel drops either to make room; a checkpoint just read is
    mostly active). A folder the mount does not show (a container's namespace) is skipped; the
    mount's root is always looked at."""
    own = _cgroup_paths(proc / "self" / "cgroup")
    tightest: tuple[int, str] | None = None
    for version, sub, limit_name, usage_name, cached, unclean in _HIERARCHIES:
        if version not in own:
            continue
        root = cgroups / sub if sub else cgroups
        folder = root / own[version].strip("/")
        for level in (folder, *folder.parents):
            if not level.is_relative_to(root):
                break
            limit = _read_int(level / limit_name)
            usage = _read_int(level / usage_name)
            if limit is None or usage is None or limit >= _UNLIMITED:
                continue
            stat = _fields(level / "memory.stat")
            clean = sum(stat.get(k, 0) for k in cached) - sum(stat.get(k, 0) for k in unclean)
            room = max(0, limit - max(0, usage - max(0, clean)))
            if tightest is None or room < tightest[0]:
                tightest = (room, f"the memory limit of cgroup {level} ({version})")
    return tightest


def _host_headroom(meminfo: dict[str, int]) -> int | None:
    """MemAvailable (+ free swap), or free memory plus the clean file cache where that is more:
    a container's /proc/meminfo made up from its cgroup (lxcfs) may count its page cache as
    used and show a MemAvailable far below what the kernel would free for a load."""
    if "MemAvailable" not in meminfo:
        return None
    clean = (meminfo.get("MemFree", 0) + meminfo.get("Active(file)", 0)
             + meminfo.get("Inactive(file)", 0) - meminfo.get("Dirty", 0)
             - meminfo.get("Writeback", 0))
    return max(meminfo["MemAvailable"], clean) + meminfo.get("SwapFree", 0)


def _address_space_headroom(proc: Path) -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    used = _fields(proc / "self" / "status").get("VmSize", 0)
    return max(0, soft - used)


def available(proc: Path | None = None, cgroups: Path | None = None) -> tuple[int, str] | None:
    """-> (bytes this process can still allocate, which limit says so), or None if unknown
    (`proc` and `cgroups`: where /proc and the cgroup mount are; PROC, CGROUPS unless given)."""
    proc, cgroups = proc or PROC, cgroups or CGROUPS
    limits = []
    host = _host_headroom(_fields(proc / "meminfo"))
    if host is not None:
        limits.append((host, "MemAvailable (or MemFree + clean file cache) + SwapFree in "
                             "/proc/meminfo"))
    cgroup = _cgroup_headroom(proc, cgroups)
    if cgroup is not None:
        limits.append(cgroup)
    address = _address_space_headroom(proc)
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
