"""mixtral.cgroup: the memory cgroup a --max-ram benchmark runs in, on mocked hierarchies (v1,
v2, none, not writable) and, where this machine allows (root, a v1 or v2 memory hierarchy), a
real one: joined, limited, left and removed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mixtral.cgroup import V1_ROOT, confine

PID = str(os.getpid())


def hierarchy(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_v1_limit_counts_the_budget_and_allowance_and_returns_home(tmp_path):
    v1 = hierarchy(tmp_path / "memory", {"memory.limit_in_bytes": "9223372036854771712",
                                         "cgroup.procs": "", "jobs/42/cgroup.procs": ""})
    proc = hierarchy(tmp_path / "proc", {"cgroup": "5:devices:/\n4:memory:/jobs/42\n0::/\n"})
    with confine(1000, 24, v1_root=v1, v2_root=tmp_path / "none",
                 proc_cgroup=proc / "cgroup") as c:
        made = v1 / f"mixtral-bench-{PID}"
        assert (c.honest, c.version, c.path, c.reason) == (True, "v1", made, None)
        assert (made / "memory.limit_in_bytes").read_text() == "1024"
        assert (made / "cgroup.procs").read_text() == PID
        (made / "memory.max_usage_in_bytes").write_text("777\n")
        assert c.report() == {"honest": True, "cgroup": "v1", "limit_bytes": 1024,
                              "allowance_bytes": 24, "peak_bytes": 777, "reason": None}
    assert (v1 / "jobs/42/cgroup.procs").read_text() == PID  # back where it was
    assert (v1 / "cgroup.procs").read_text() == ""


def test_v2_limit_is_memory_max(tmp_path):
    v2 = hierarchy(tmp_path / "unified", {"cgroup.controllers": "cpuset cpu io memory pids\n",
                                          "cgroup.procs": ""})
    proc = hierarchy(tmp_path / "proc", {"cgroup": "0::/\n"})
    with confine(2**30, v1_root=tmp_path / "no-v1", v2_root=v2,
                 proc_cgroup=proc / "cgroup") as c:
        assert (c.honest, c.version) == (True, "v2")
        assert int((c.path / "memory.max").read_text()) == 2**30 + 512 * 2**20
        assert c.peak_bytes() is None  # no memory.peak (older kernels): unknown, not 0
    assert (v2 / "cgroup.procs").read_text() == PID


def test_no_hierarchy_runs_the_work_and_says_it_is_not_honest(tmp_path):
    v2 = hierarchy(tmp_path / "unified", {"cgroup.controllers": "cpu io\n"})
    with confine(2**30, v1_root=tmp_path / "no-v1", v2_root=v2) as c:
        report = c.report()
    assert report["honest"] is False and report["cgroup"] is None
    assert report["limit_bytes"] == 2**30 + 512 * 2**20 and report["peak_bytes"] is None
    assert "no memory cgroup hierarchy" in report["reason"]


def test_a_hierarchy_that_cannot_be_written_is_not_honest(tmp_path):
    v1 = hierarchy(tmp_path / "memory", {"memory.limit_in_bytes": "1",
                                         f"mixtral-bench-{PID}": "in the way"})
    with confine(2**30, v1_root=v1, v2_root=tmp_path / "none") as c:
        assert not c.honest
        assert f"cannot make a v1 memory cgroup {v1}/mixtral-bench-{PID}" in c.reason


def my_memory_cgroup() -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if "memory" in line.split(":")[1].split(","):
            return line.split(":", 2)[2]
    return ""


@pytest.mark.skipif(not os.access(V1_ROOT / "memory.limit_in_bytes", os.W_OK),
                    reason="needs root and a cgroup v1 memory hierarchy")
def test_a_real_v1_cgroup_is_joined_limited_and_removed():
    before = my_memory_cgroup()
    with confine(2**30) as c:
        assert c.honest, c.reason
        assert my_memory_cgroup() == f"/mixtral-bench-{PID}"
        assert int((c.path / "memory.limit_in_bytes").read_text()) == 2**30 + 512 * 2**20
        block = b"\x01" * (64 * 2**20)  # written, so charged to the cgroup: its peak sees it
        assert c.peak_bytes() >= len(block)
    assert my_memory_cgroup() == before and not c.path.exists()


def test_a_killed_runs_cgroup_is_removed(tmp_path, monkeypatch):
    from mixtral import cgroup

    monkeypatch.setattr(cgroup, "V1_ROOT", tmp_path)
    (tmp_path / "mixtral-bench-123").mkdir()
    hierarchy(tmp_path / "mixtral-bench-456", {"cgroup.procs": "456"})  # not empty: kept
    cgroup.remove_left(123)
    cgroup.remove_left(456)
    cgroup.remove_left(789)  # none: nothing to do
    assert not (tmp_path / "mixtral-bench-123").exists()
    assert (tmp_path / "mixtral-bench-456").exists()
