"""The memory check before a load (mixtral.memory), on fake /proc and cgroup files: the clean
page cache counts as available, a cgroup's ancestors' limits bind, and the tightest limit is
the one named when a load is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from mixtral import memory
from mixtral.memory import NotEnoughMemoryError, available, check_fits

GIB = 2**30
KB = 1024


def meminfo(proc: Path, **fields: int) -> None:
    """/proc/meminfo with these fields in bytes (written in kB, as the kernel does)."""
    proc.mkdir(parents=True, exist_ok=True)
    lines = [f"{name.replace('_file', '(file)')}: {v // KB} kB" for name, v in fields.items()]
    (proc / "meminfo").write_text("\n".join(lines) + "\n")


def cgroup_of_self(proc: Path, *lines: str) -> None:
    (proc / "self").mkdir(parents=True, exist_ok=True)
    (proc / "self" / "cgroup").write_text("\n".join(lines) + "\n")


def cgroup(folder: Path, limit: str, usage: int, limit_name: str, usage_name: str,
           **stat: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / limit_name).write_text(limit + "\n")
    (folder / usage_name).write_text(f"{usage}\n")
    (folder / "memory.stat").write_text("".join(f"{k} {v}\n" for k, v in stat.items()))


def v1(folder: Path, limit: int | str, usage: int, **stat: int) -> None:
    cgroup(folder, str(limit), usage, "memory.limit_in_bytes", "memory.usage_in_bytes", **stat)


def v2(folder: Path, limit: int | str, usage: int, **stat: int) -> None:
    cgroup(folder, str(limit), usage, "memory.max", "memory.current", **stat)


@pytest.fixture
def host(tmp_path):
    """A 24 GiB machine with plenty available and no cgroup files yet."""
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    meminfo(proc, MemTotal=24 * GIB, MemFree=10 * GIB, MemAvailable=20 * GIB, Active_file=4 * GIB,
            Inactive_file=5 * GIB, Dirty=0, Writeback=0, SwapFree=0)
    cgroup_of_self(proc, "0::/")
    cgroups.mkdir()
    return proc, cgroups


def test_no_cgroup_limit_leaves_the_host(host):
    proc, cgroups = host
    assert available(proc, cgroups) == (20 * GIB, "MemAvailable (or MemFree + clean file "
                                                   "cache) + SwapFree in /proc/meminfo")
    nothing = available(proc / "none", cgroups / "none")
    assert nothing is None or nothing[1].startswith("RLIMIT_AS")  # unless ulimit -v is set


def test_a_page_cache_counted_as_used_does_not_hide_free_memory(host):
    """A container's made-up meminfo (lxcfs) showing MemAvailable = MemFree while 9 GiB of it
    is clean file cache: what the kernel would free counts (dirty pages do not)."""
    proc, cgroups = host
    meminfo(proc, MemFree=2 * GIB, MemAvailable=2 * GIB, Active_file=6 * GIB,
            Inactive_file=3 * GIB, Dirty=GIB, Writeback=0, SwapFree=GIB)
    assert available(proc, cgroups)[0] == (2 + 6 + 3 - 1 + 1) * GIB


def test_v1_active_page_cache_is_headroom_and_an_ancestor_limit_binds(host, monkeypatch):
    """Our v1 cgroup has no limit of its own; its parent does (8 GiB), using 7 GiB of which
    4.5 GiB is clean file cache (a checkpoint just read is mostly *active* file pages). Before,
    the own unlimited folder ended the search (no limit seen), and only inactive pages counted
    as free."""
    proc, cgroups = host
    cgroup_of_self(proc, "4:memory:/jobs/me", "0::/")
    v1(cgroups / "memory", 2**63 - 4096, 12 * GIB)  # the root: no limit
    v1(cgroups / "memory" / "jobs", 8 * GIB, 7 * GIB, total_active_file=3 * GIB,
       total_inactive_file=2 * GIB, total_dirty=GIB // 2, total_writeback=0)
    v1(cgroups / "memory" / "jobs" / "me", 2**63 - 4096, 6 * GIB)
    room, what = available(proc, cgroups)
    assert room == 8 * GIB - (7 * GIB - (5 * GIB - GIB // 2))
    assert what == f"the memory limit of cgroup {cgroups / 'memory' / 'jobs'} (v1)"
    monkeypatch.setattr(memory, "PROC", proc)
    monkeypatch.setattr(memory, "CGROUPS", cgroups)
    with pytest.raises(NotEnoughMemoryError, match=r"needs 6.00 GiB but only 5.50 GiB is "
                       r"available \(the memory limit of cgroup .*jobs \(v1\)\); lower"):
        check_fits(6 * GIB, "a load", "lower --max-ram")
    check_fits(int(5.5 * GIB), "a load", "lower --max-ram")


def test_v2_the_tightest_of_the_nested_limits(host):
    """Our own v2 cgroup: 4 GiB, 1 GiB used; its parent: 16 GiB, 15 GiB used (no file cache):
    1 GiB left in all, the parent's; a folder the mount does not show is skipped."""
    proc, cgroups = host
    cgroup_of_self(proc, "0::/user.slice/app")
    v2(cgroups / "user.slice", 16 * GIB, 15 * GIB)
    v2(cgroups / "user.slice" / "app", 4 * GIB, GIB, active_file=0, inactive_file=0)
    assert available(proc, cgroups) == (GIB, f"the memory limit of cgroup "
                                             f"{cgroups / 'user.slice'} (v2)")
    cgroup_of_self(proc, "0::/elsewhere/hidden")  # a namespace: only the root is seen
    v2(cgroups, "max", 20 * GIB)
    assert available(proc, cgroups)[1].startswith("MemAvailable")
    v2(cgroups, 3 * GIB, GIB, active_file=GIB)
    assert available(proc, cgroups) == (3 * GIB, f"the memory limit of cgroup {cgroups} (v2)")
