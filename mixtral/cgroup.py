"""A memory cgroup around a measurement, so that a RAM budget means what a small machine means.

On a machine with more RAM than the budget, the kernel's page cache keeps what the experts
cache evicts, and a "miss" is served from RAM: offloading figures measured so flatter the disk
(issue 16). A memory cgroup's limit counts the page cache its processes fill, so inside one the
process sees the budget and no more. cgroup v1 (`memory.limit_in_bytes` under
/sys/fs/cgroup/memory) and v2 (`memory.max` where the mount's controllers include memory) are
both used as found; a fresh cgroup is made at the top of the hierarchy, this process moved in
(with all its threads) before the measured work loads (memory charged before stays where it
was), and on exit moved back where it was and the cgroup removed. Where neither is available
or writable (not root, a container without a writable hierarchy, not Linux), `confine` still
runs the work and says why the figure is not honest.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ALLOWANCE = 512 * 2**20  # beyond the budget: the interpreter, libtorch's pages, allocator slack
V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")


@dataclass
class Confinement:
    """What `confine` set up: `honest` when the limit (page cache included) is in force."""

    limit_bytes: int
    allowance_bytes: int
    version: str | None = None  # "v1", "v2", or None when no cgroup could be made
    path: Path | None = None
    reason: str | None = None  # why not honest

    @property
    def honest(self) -> bool:
        return self.version is not None

    def peak_bytes(self) -> int | None:
        """The cgroup's peak use (its processes' memory and page cache), where it says."""
        name = {"v1": "memory.max_usage_in_bytes", "v2": "memory.peak"}.get(self.version or "")
        if name is None or self.path is None:
            return None
        try:
            return int((self.path / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def report(self) -> dict[str, object]:
        """The bench's `memory_limit` JSON value."""
        return {"honest": self.honest, "cgroup": self.version, "limit_bytes": self.limit_bytes,
                "allowance_bytes": self.allowance_bytes, "peak_bytes": self.peak_bytes(),
                "reason": self.reason}


@contextlib.contextmanager
def confine(budget: int, allowance: int = ALLOWANCE, *, v1_root: Path | None = None,
            v2_root: Path | None = None,
            proc_cgroup: Path = Path("/proc/self/cgroup")) -> Iterator[Confinement]:
    """This process inside a memory cgroup of `budget + allowance` bytes for the block (the
    hierarchies' roots: V1_ROOT, V2_ROOT unless given)."""
    v1_root, v2_root = v1_root or V1_ROOT, v2_root or V2_ROOT
    limit = budget + allowance
    pid = str(os.getpid())
    mine = _read(proc_cgroup).splitlines()  # where this process is now: it returns there
    place: tuple[str, Path, Path, str] | None = None  # version, cgroup, its procs file, limit file
    reasons = []
    if (v1_root / "memory.limit_in_bytes").exists():
        rel = _home(mine, lambda controllers: "memory" in controllers.split(","))
        place = ("v1", v1_root / f"mixtral-bench-{pid}", v1_root / rel / "cgroup.procs",
                 "memory.limit_in_bytes")
    elif "memory" in _read(v2_root / "cgroup.controllers").split():
        rel = _home(mine, lambda controllers: controllers == "")
        place = ("v2", v2_root / f"mixtral-bench-{pid}", v2_root / rel / "cgroup.procs",
                 "memory.max")
    else:
        reasons.append(f"no memory cgroup hierarchy ({v1_root} has no memory.limit_in_bytes; "
                       f"{v2_root / 'cgroup.controllers'} lists no memory controller)")
    confinement = Confinement(limit, allowance)
    if place is not None:
        version, path, home, limit_file = place
        try:
            path.mkdir()
        except OSError as e:
            reasons.append(f"cannot make a {version} memory cgroup {path}: {e.strerror or e}")
        else:
            try:
                (path / limit_file).write_text(str(limit))
                (path / "cgroup.procs").write_text(pid)
                confinement.version, confinement.path = version, path
            except OSError as e:
                reasons.append(f"cannot limit or join {path}: {e.strerror or e}")
                _remove(path, home, pid)
    confinement.reason = "; ".join(reasons) or None
    try:
        yield confinement
    finally:
        if confinement.path is not None and place is not None:
            _remove(confinement.path, place[2], pid)


def remove_left(pid: int) -> None:
    """Remove the cgroup a process killed inside `confine` left (an OOM kill skips its exit);
    nothing happens where there is none or it still holds a process."""
    for root in (V1_ROOT, V2_ROOT):
        with contextlib.suppress(OSError):
            (root / f"mixtral-bench-{pid}").rmdir()


def _home(lines: list[str], match: Callable[[str], bool]) -> str:
    """This process's cgroup (relative to its hierarchy's root) from /proc/self/cgroup's
    `id:controllers:/path` lines; the root where none matches."""
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and match(parts[1]):
            return parts[2].lstrip("/")
    return ""


def _remove(path: Path, home: Path, pid: str) -> None:
    """Move this process back where it was, then remove the cgroup (best effort: a cgroup
    left behind is empty and harmless)."""
    with contextlib.suppress(OSError):
        home.write_text(pid)
    with contextlib.suppress(OSError):
        path.rmdir()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
