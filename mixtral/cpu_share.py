"""How many CPU cores are left to this process: what the rest of the machine uses, read from
/proc and the cgroup, for the adaptive thread count (mixtral/threads.py).

A `Reader` takes a `Sample` (a few small files, once a second at most, never per token):

  busy    CPU-seconds the CPUs this process may run on (its affinity mask) spent busy, from
          /proc/stat's per-CPU lines: user, nice, system, irq, softirq and steal. Steal is time
          the hypervisor gave another guest: on a VM it is a neighbour as real as a local one.
  own     CPU-seconds this process used (/proc/self/stat's utime + stime, all its threads).
  quota   the cores a cgroup CPU quota allows (v2 `cpu.max`, v1 `cpu.cfs_quota_us` /
          `cpu.cfs_period_us`; the tightest of this process's cgroup and its ancestors), and
  group   the CPU-seconds that cgroup has used (v2 `cpu.stat` usage_usec, v1 `cpuacct.usage`):
          in a container the quota is shared by everything in it, and /proc/stat shows the host.

Between two samples `free` is what is left to us, in cores: the affinity's cores minus what
other processes kept busy, and within a quota, the quota minus what the rest of the cgroup used.
Both are averages over the window: a neighbour that competes with our threads gets less than
it would alone (two spinning threads and one busy process on 2 cores: ~0.67 core each), which
the policy's thresholds allow for.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# /proc/stat's per-CPU columns that count as busy: user nice system idle iowait irq softirq
# steal (guest and guest_nice are already inside user and nice)
_BUSY = (0, 1, 2, 5, 6, 7)


@dataclass(frozen=True)
class Sample:
    at: float              # monotonic seconds
    cores: int             # CPUs this process may run on
    busy: float            # CPU-seconds those CPUs were busy (steal included), since boot
    own: float             # CPU-seconds this process used
    quota: float | None    # cores the cgroup quota allows (None: no quota)
    group: float | None    # CPU-seconds the quota's cgroup used (None: unknown or no quota)

    @property
    def cap(self) -> int:
        """The most threads worth running: the cores, or the quota's whole cores (a thread
        beyond the quota is throttled, and a team waits on its slowest thread)."""
        if self.quota is None:
            return self.cores
        return max(1, min(self.cores, math.floor(self.quota + 1e-9)))


def free(a: Sample, b: Sample) -> float:
    """Cores left to this process between samples a and b (b later)."""
    wall = b.at - a.at
    if wall <= 0:
        raise ValueError("samples must be taken in order, apart in time")
    own = b.own - a.own
    left = b.cores - max(0.0, b.busy - a.busy - own) / wall
    if b.quota is not None and a.group is not None and b.group is not None:
        left = min(left, b.quota - max(0.0, b.group - a.group - own) / wall)
    return max(0.0, left)


class Reader:
    """Samples this machine (the roots and clock are parameters for tests)."""

    def __init__(self, proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup"),
                 affinity: Callable[[], set[int]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.proc, self.clock = proc, clock
        self.affinity = affinity or (lambda: os.sched_getaffinity(0))
        self.tick = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
        # the quota and where its usage is counted: read once (a quota rarely changes)
        self.quota, self._usage, self._usage_scale = _quota(proc, cgroup)

    def sample(self) -> Sample:
        """OSError or ValueError where the files are missing or unreadable."""
        cpus = self.affinity()
        busy = 0
        for line in (self.proc / "stat").read_text().splitlines():
            name, _, values = line.partition(" ")
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                fields = values.split()
                busy += sum(int(fields[i]) for i in _BUSY if i < len(fields))
        stat = (self.proc / "self" / "stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": comm may hold spaces
        own = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
        group = None
        if self._usage is not None:
            group = _usage(self._usage) * self._usage_scale
        return Sample(self.clock(), len(cpus), busy / self.tick, own / self.tick, self.quota,
                      group)


def _quota(proc: Path, root: Path) -> tuple[float | None, Path | None, float]:
    """(quota in cores, the file counting its cgroup's usage, seconds per unit of it): the
    tightest quota on this process's cgroup and its ancestors, v2 or v1."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None, None, 1.0
    best: tuple[float | None, Path | None, float] = (None, None, 1.0)
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers, rel = parts[1].split(","), parts[2].strip("/")
        found: list[tuple[float | None, Path | None]]
        if parts[1] == "":  # v2: "0::/path"
            found = [(_v2_quota(root / p), root / p / "cpu.stat") for p in _ancestors(rel)]
            scale = 1e-6
        elif "cpu" in controllers:  # v1: the cpu controller's mount, often with cpuacct
            mounts = [root / parts[1], root / "cpu", root / "cpu,cpuacct"]
            found = [(_v1_quota(m / p), _cpuacct(root, m, p))
                     for m in mounts if m.is_dir() for p in _ancestors(rel)]
            scale = 1e-9
        else:
            continue
        for quota, usage in found:
            if quota is not None and (best[0] is None or quota < best[0]):
                best = (quota, usage if usage is not None and usage.exists() else None, scale)
    return best


def _ancestors(rel: str) -> list[str]:
    """"a/b" -> ["a/b", "a", ""]: a cgroup and every one above it."""
    parts = [p for p in rel.split("/") if p]
    return ["/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _v2_quota(group: Path) -> float | None:
    try:
        limit, period = (group / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) / int(period)


def _v1_quota(group: Path) -> float | None:
    try:
        limit = int((group / "cpu.cfs_quota_us").read_text())
        period = int((group / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if limit <= 0 or period <= 0 else limit / period


def _cpuacct(root: Path, cpu_mount: Path, rel: str) -> Path | None:
    """The v1 cpuacct.usage (nanoseconds) of the cgroup at `rel`: in the cpu controller's own
    mount when they share one, else in the cpuacct mount."""
    for mount in (cpu_mount, root / "cpuacct", root / "cpu,cpuacct"):
        path = mount / rel / "cpuacct.usage"
        if path.exists():
            return path
    return None


def _usage(path: Path) -> float:
    text = path.read_text()
    if path.name == "cpu.stat":  # v2: "usage_usec N" among others
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return float(value)
        raise ValueError(f"{path} has no usage_usec")
    return float(text.split()[0])
