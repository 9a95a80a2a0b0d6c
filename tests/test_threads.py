"""The adaptive thread count (mixtral/threads.py over mixtral/cpu_share.py), on fake /proc and
cgroup files and fake clocks: what it reads, what it decides (quiet: all cores; a core busy
elsewhere: one fewer; flapping input: no flapping; quotas and the user's choices respected),
and that the engine applies the decision between steps, on the thread that runs the model."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import pytest
import torch

from mixtral import cpu_share, threads
from mixtral.default_model import random_tiny
from mixtral.engine import Engine
from mixtral.generate import GenerationParams


@pytest.fixture(autouse=True)
def torch_threads(monkeypatch):
    """Each test starts from 4 threads (the fakes below have 4 cores) and gives back the
    count it found; no MIXTRAL_THREADS or OMP_NUM_THREADS from outside."""
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    threads.choose(None)
    torch.set_num_threads(before)


# --- reading the machine ---------------------------------------------------------------------

class Machine:
    """A fake /proc and /sys/fs/cgroup: CPU ticks (100 a second) that tests advance."""

    def __init__(self, root: Path, cores: int = 4, cgroup: str = "0::/\n") -> None:
        self.root, self.cores = root, cores
        self.ticks = {i: [0] * 10 for i in range(cores)}  # per CPU: proc(5)'s 10 columns
        self.own = [0, 0]  # utime, stime
        (root / "proc" / "self").mkdir(parents=True)
        (root / "proc" / "self" / "cgroup").write_text(cgroup)
        (root / "cg").mkdir()
        self.now = 0.0
        self.write()

    def write(self) -> None:
        total = [sum(col) for col in zip(*self.ticks.values(), strict=True)]
        lines = ["cpu  " + " ".join(map(str, total))]
        lines += [f"cpu{i} " + " ".join(map(str, t)) for i, t in self.ticks.items()]
        (self.root / "proc" / "stat").write_text("\n".join(lines + ["intr 1 2 3"]) + "\n")
        # comm with spaces and a ')' in it: fields are counted from the last ')'
        rest = ["S"] + ["0"] * 10 + [str(self.own[0]), str(self.own[1])] + ["0"] * 30
        (self.root / "proc" / "self" / "stat").write_text("42 (a b) c) " + " ".join(rest))

    def advance(self, seconds: float, others: float = 0.0, own: float = 0.0,
                steal: float = 0.0) -> None:
        """`others` cores busy in other processes (user time), `own` in ours, `steal` taken by
        the hypervisor, the rest idle, spread over the CPUs in order."""
        per = int(round(100 * seconds))
        for kind, column in ((others + own, 0), (steal, 7)):
            left = kind
            for t in self.ticks.values():
                share = min(1.0, left)
                t[column] += int(round(per * share))
                left -= share
        for t in self.ticks.values():
            t[3] += per  # idle: kept growing, only the busy columns matter
        self.own[0] += int(round(per * own))
        self.now += seconds
        self.write()

    def reader(self, affinity: set[int] | None = None) -> cpu_share.Reader:
        cpus = affinity if affinity is not None else set(range(self.cores))
        reader = cpu_share.Reader(self.root / "proc", self.root / "cg", lambda: cpus,
                                  lambda: self.now)
        reader.tick = 100.0
        return reader


def window(machine: Machine, reader: cpu_share.Reader, **load: float) -> float:
    a = reader.sample()
    machine.advance(1.0, **load)
    return cpu_share.free(a, reader.sample())


def test_quiet_machine_leaves_every_core(tmp_path):
    m = Machine(tmp_path)
    assert window(m, m.reader(), own=2.0) == pytest.approx(4.0)


def test_other_processes_and_steal_take_cores(tmp_path):
    m = Machine(tmp_path)
    r = m.reader()
    assert window(m, r, others=1.0, own=2.0) == pytest.approx(3.0)
    assert window(m, r, others=1.0, steal=0.5, own=1.0) == pytest.approx(2.5)


def test_only_the_cpus_of_the_affinity_mask_count(tmp_path):
    m = Machine(tmp_path)
    r = m.reader(affinity={2, 3})  # others busy on cpu0 and cpu1 only: not ours
    a = r.sample()
    m.advance(1.0, others=2.0)
    b = r.sample()
    assert (b.cores, cpu_share.free(a, b)) == (2, pytest.approx(2.0))


def test_a_v2_quota_caps_and_counts_the_rest_of_its_cgroup(tmp_path):
    m = Machine(tmp_path, cgroup="0::/box/inner\n")
    box = tmp_path / "cg" / "box"
    (box / "inner").mkdir(parents=True)
    (box / "inner" / "cpu.max").write_text("max 100000\n")
    (box / "cpu.max").write_text("250000 100000\n")  # an ancestor's quota binds too
    (box / "cpu.stat").write_text("usage_usec 0\nuser_usec 0\n")
    r = m.reader()
    a = r.sample()
    assert (a.quota, a.cap) == (2.5, 2)
    m.advance(1.0, others=0.5, own=1.0)  # the 0.5 is a process in our container
    (box / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 0\n")
    assert cpu_share.free(a, r.sample()) == pytest.approx(2.0)  # 2.5 - 0.5; the host has 3.5


def test_a_v1_quota_is_read_too(tmp_path):
    m = Machine(tmp_path, cgroup="3:cpu,cpuacct:/docker/x\n")
    group = tmp_path / "cg" / "cpu,cpuacct" / "docker" / "x"
    group.mkdir(parents=True)
    (group / "cpu.cfs_quota_us").write_text("150000\n")
    (group / "cpu.cfs_period_us").write_text("100000\n")
    (group / "cpuacct.usage").write_text("0\n")
    s = m.reader().sample()
    assert (s.quota, s.cap, s.group) == (1.5, 1, 0.0)


def test_no_quota_where_there_is_none(tmp_path):
    m = Machine(tmp_path, cgroup="1:cpu:/\n0::/\n")
    (tmp_path / "cg" / "cpu").mkdir()
    (tmp_path / "cg" / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cg" / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cg" / "cpu.max").write_text("max 100000\n")
    s = m.reader().sample()
    assert (s.quota, s.group, s.cap) == (None, None, 4)


# --- deciding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("current,free,want", [
    (4, 4.0, 4), (4, 3.6, 4), (4, 3.4, 3), (4, 2.2, 2), (4, 0.1, 1),  # down past half a core
    (3, 3.6, 3), (3, 3.8, 4), (1, 1.7, 1), (1, 1.8, 2), (1, 9.0, 4),  # up past three quarters
    (2, 1.33, 1),  # two spinning threads and one busy process on 2 cores: it gets ~0.67
])
def test_target(current, free, want):
    assert threads.target(current, free, cap=4) == want


class Fake:
    """A reader of scripted windows: each read advances the clock one second, with `others`
    cores busy elsewhere (or raises what it is given)."""

    def __init__(self, tmp_path: Path, script: list[float | Exception]) -> None:
        self.machine = Machine(tmp_path)
        self.reader = self.machine.reader()
        self.script = iter(script)
        self.reads = 0

    def __call__(self) -> cpu_share.Sample:
        self.reads += 1
        step = next(self.script)
        if isinstance(step, Exception):
            raise step
        self.machine.advance(1.0, others=step, own=4.0 - step)
        return self.reader.sample()


def adaptive(fake: Fake) -> threads.Adaptive:
    return threads.Adaptive(fake, interval=1.0, clock=lambda: fake.machine.now)


def run(policy: threads.Adaptive, steps: int) -> list[int]:
    """The count after each of `steps` windows."""
    seen = []
    for _ in range(steps):
        policy.between_steps()
        seen.append(torch.get_num_threads())
    return seen


def test_quiet_keeps_every_thread(tmp_path):
    assert run(adaptive(Fake(tmp_path, [0.0] * 6)), 6) == [4] * 6


def test_one_busy_core_costs_one_thread_after_two_windows_and_it_comes_back(tmp_path):
    script = [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]  # the first read is a baseline
    assert run(adaptive(Fake(tmp_path, script)), 7) == [4, 4, 3, 3, 3, 4, 4]


def test_flapping_input_does_not_flap(tmp_path):
    script = [0.0] + [1.0, 0.0] * 5
    assert run(adaptive(Fake(tmp_path, script)), 11) == [4] * 11
    script = [0.0, 1.0, 1.0] + [0.0, 1.0] * 4  # down once, then flapping: stays down
    assert run(adaptive(Fake(tmp_path / "2", script)), 11) == [4, 4, 3] + [3] * 8


def test_the_machine_is_read_once_a_window_not_once_a_step(tmp_path):
    fake = Fake(tmp_path, [0.0] * 3)
    policy = threads.Adaptive(fake, interval=1.0, clock=lambda: 0.5)
    for _ in range(100):  # steps within one window: the clock stands still
        policy.between_steps()
    assert fake.reads == 1


def test_a_window_spanning_an_idle_engine_is_only_a_baseline(tmp_path):
    fake = Fake(tmp_path, [0.0, 3.0, 3.0])
    policy = adaptive(fake)
    policy.between_steps()
    fake.machine.advance(60.0)  # idle for a minute: nothing stepped
    assert run(policy, 2) == [4, 4]  # the stale window decides nothing; one fresh is not two


def test_a_quota_below_the_count_applies_at_once(tmp_path):
    fake = Fake(tmp_path, [0.0, 0.0])
    fake.reader.quota = 2.0
    assert run(adaptive(fake), 2) == [2, 2]


def test_a_count_set_by_the_user_while_it_runs_stops_it(tmp_path, caplog):
    fake = Fake(tmp_path, [0.0, 3.0, 3.0, 3.0, 3.0])
    policy = adaptive(fake)
    policy.between_steps()
    torch.set_num_threads(3)
    assert run(policy, 4) == [3] * 4
    assert policy.off == "the thread count was set to 3 by someone else"


def test_a_count_set_before_it_starts_is_its_ceiling(tmp_path):
    torch.set_num_threads(2)
    assert run(adaptive(Fake(tmp_path, [0.0] * 4)), 4) == [2] * 4


def test_a_machine_it_cannot_read_turns_it_off_without_raising(tmp_path):
    policy = adaptive(Fake(tmp_path, [FileNotFoundError(2, "no /proc/stat")]))
    assert run(policy, 3) == [4] * 3
    assert policy.off is not None and "FileNotFoundError" in policy.off


def test_the_policy_chosen(monkeypatch):
    assert isinstance(threads.policy(), threads.Adaptive)  # the default
    monkeypatch.setenv(threads.ENV, "fixed")
    assert isinstance(threads.policy(), threads.Fixed)
    monkeypatch.setenv(threads.ENV, "adaptive")
    assert isinstance(threads.policy(), threads.Adaptive)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's count: never adapted
    assert isinstance(threads.policy(), threads.Fixed)
    assert "OMP_NUM_THREADS=3 (set by the user)" in threads.describe()
    monkeypatch.delenv("OMP_NUM_THREADS")
    threads.choose("3")  # `mixtral serve --threads 3`, over the environment
    fixed = threads.policy()
    fixed.between_steps()
    assert torch.get_num_threads() == 3
    monkeypatch.setenv(threads.ENV, "many")
    threads.choose(None)
    with pytest.raises(threads.ThreadsError, match="MIXTRAL_THREADS='many' is not a thread"):
        threads.policy()
    for bad in ("0", "-1", "auto", ""):
        with pytest.raises(threads.ThreadsError):
            threads.parse(bad)


# --- in the engine -----------------------------------------------------------------------------

@pytest.mark.parametrize("own_thread", [False, True])
def test_the_engine_applies_the_decision_between_steps(tmp_path, own_thread):
    """A monitor saying "one core left" (and two windows in a row) takes effect between steps:
    the model sees 4 threads in the first steps, then 1, on whichever thread runs it."""
    model = random_tiny()
    seen: list[tuple[int, str]] = []
    hook = model.register_forward_pre_hook(
        lambda m, a: seen.append((torch.get_num_threads(), threading.current_thread().name)))
    fake = Fake(tmp_path, [0.0] + [3.0] * 40)
    clock = itertools.count()  # every step is a window
    engine = Engine(model, thread=own_thread)
    engine.threads = threads.Adaptive(fake, interval=1.0, clock=lambda: float(next(clock)))
    done = threading.Event()
    try:
        engine.submit([1, 2, 3], GenerationParams(max_tokens=8, min_tokens=8), lambda t: None,
                      lambda e: done.set())
        if not own_thread:
            engine.run(until_idle=True)
        assert done.wait(60)
    finally:
        engine.stop()
        hook.remove()
    counts = [n for n, _ in seen]
    assert counts[:3] == [4, 4, 4] and counts[3:] == [1] * (len(counts) - 3)
    assert {name for _, name in seen} == {"mixtral-engine" if own_thread else "MainThread"}


def test_serve_refuses_a_bad_policy_in_one_line(monkeypatch, capsys):
    from mixtral.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["serve", "--threads", "lots"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "argument --threads: 'lots' is not a thread policy" in err and err.count("\n") == 1
    monkeypatch.setenv(threads.ENV, "lots")  # before the port opens, not in the engine
    assert main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == ("mixtral serve: error: MIXTRAL_THREADS='lots' is not a thread policy: use "
                   "adaptive, fixed or a count of threads (1 or more)")
