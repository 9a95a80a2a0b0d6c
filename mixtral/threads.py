"""How PyTorch's OpenMP threads wait between parallel regions (set once before torch starts),
and how many there are (adapted between engine steps unless fixed).

A decoding step runs a few hundred short parallel regions (every kernel call is one). Between
them libgomp's threads spin for a while (GOMP's default: 300,000 iterations, ~0.1-1 ms) before
sleeping, which wins on an idle machine and loses badly on a shared one: a spinning thread
burns the core the other process, or our own other thread, needs next, and every barrier then
waits on a descheduled thread. Measured on the 2-core Zen 5, bench model, b=1 / b=8 decode
tok/s (benchmarks/RESULTS.md, "OpenMP wait policy"):

                               quiet machine              one busy neighbour process
  GOMP default (spin 300k)     int4 165-172 / 241-283     int4 12.8 / 34.3, bf16 15.6 / 22.6
  GOMP_SPINCOUNT=10000         int4 180 / 328             int4 22.1 / 56.8, bf16 14-17 / 36-42
  GOMP_SPINCOUNT=1000          int4 103-152 / 212-289     int4 35.5 / 88.7, bf16 22-43 / 49-78
  OMP_WAIT_POLICY=PASSIVE      int4 78 / 144              int4 32.9 / 84.9, bf16 23.4 / 61.0

So the default here is a short spin, GOMP_SPINCOUNT=10000: the quiet figures do not move and
a shared machine gets 1.4-1.7x the default's int4 speed. OMP_WAIT_POLICY=PASSIVE (or
GOMP_SPINCOUNT=1000) gives 2.5x the default on a shared machine but costs ~half the quiet
speed; the adaptive thread count below does as well on a shared machine without that cost.
A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT always wins, and neither has any effect once
torch has started (import mixtral first; the CLI does).

Paging experts from disk (--max-ram) is the exception: the thread that runs the model blocks in
a read (~5-10 ms an expert) between most computations, long enough for the other threads to
fall asleep, and on this project's KVM guest waking them took 4-8 ms at each first parallel
region after a read (a 3.7 MB sum: 0.2 ms with the threads awake, 4-8 ms without). So a
command given --max-ram spins for ~200 ms instead (PAGING_SPINCOUNT; the CLI sets it before
torch starts): with the experts read on the caller's thread, a token's compute fell from 360
to 200 ms and its packing from 230 to 130 at 8 GiB, 0.43 -> 0.51 tok/s (RESULTS.md, "Threads
that stay awake across reads"). mixtral.load(max_ram=...) in a program that started torch
itself keeps whatever spin it has; set GOMP_SPINCOUNT=8000000 before torch for the same.

The wait policy cannot change once OpenMP has started; the number of threads can. With
MIXTRAL_THREADS=adaptive (the default; `mixtral serve --threads adaptive`) the engine asks
`Adaptive` between steps, on the thread that runs the model, whether to change torch's thread
count: once a second at most it reads what the rest of the machine uses (mixtral/cpu_share.py:
/proc/stat minus this process, steal included, within the affinity mask and any cgroup CPU
quota) and runs as many threads as cores are left, at least one, so that a short-spinning team
never waits on a thread whose core another process holds. Hysteresis keeps it from flapping: it
drops a thread when others hold more than half a core of ours, takes it back when they hold
under a quarter, and only after two one-second windows in a row agree (a quota below the thread
count applies at once). Our kernels (csrc/, at::parallel_for) and oneDNN follow torch's count.
A step between windows costs one clock read; a window's read ~0.1 ms (busy 2-core machine).
Adaptive is the default, by measurement (benchmarks/load.py, `mixtral serve` on the default
model, 8 clients on the same 2 cores, 4 interleaved rounds, RESULTS.md "Thread count policy"):
quiet, 0.93x the fixed count's tok/s (the clients' own process is a neighbour that sometimes
costs a thread); beside one busy process, 5.8x (336 vs 58 tok/s, median). Against
OMP_WAIT_POLICY=PASSIVE: 1.6-1.7x quiet, 0.95-0.98x loaded. A process alone on its cores keeps
every thread (`mixtral bench` int4 decode, 3 rounds: median 119 tok/s either way).
MIXTRAL_THREADS=fixed keeps torch's count; MIXTRAL_THREADS=N fixes it at N. A user's choice
wins: with OMP_NUM_THREADS set the count is never adapted, a count set by
torch.set_num_threads before the engine starts is the most it uses, and one set while it runs
stops the adapting.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Protocol

from mixtral import cpu_share

log = logging.getLogger("mixtral.threads")

SPINCOUNT = "10000"
PAGING_SPINCOUNT = "8000000"  # ~200 ms of spinning on the Zen 5: a few experts' reads
ENV = "MIXTRAL_THREADS"
DEFAULT = "adaptive"  # by measurement: see the module's docstring
# others' use of our cores, in cores, that costs a thread / that gives one back: two spinning
# threads and one busy process on 2 cores leave it ~0.67 core, above DOWN
DOWN, UP = 0.5, 0.25
_USER = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


_ours = False  # GOMP_SPINCOUNT was set here, not by the user


def set_policy(paging: bool = False) -> None:
    """Our default wait policy, unless the user chose one or torch has started already (its
    OpenMP runtime read the environment then); mixtral/__init__.py calls it first, and the CLI
    again with `paging` for a command given --max-ram (the longer spin, see above)."""
    global _ours
    if "torch" in sys.modules or (not _ours and any(os.environ.get(n) for n in _USER)):
        return
    os.environ["GOMP_SPINCOUNT"] = PAGING_SPINCOUNT if paging else SPINCOUNT
    _ours = True


def describe() -> str:
    """The wait policy and thread count policy in force, for `mixtral info --system`."""
    return f"{_describe_wait()}; threads: {_describe_count()}"


def _describe_wait() -> str:
    chosen = {n: os.environ[n] for n in _USER if os.environ.get(n)}
    if not chosen:
        return "GOMP's default spin (torch started before mixtral set GOMP_SPINCOUNT)"
    ours = chosen in ({"GOMP_SPINCOUNT": SPINCOUNT}, {"GOMP_SPINCOUNT": PAGING_SPINCOUNT})
    paging = " for paging experts from disk" if chosen == {"GOMP_SPINCOUNT": PAGING_SPINCOUNT} \
        else ""
    return (", ".join(f"{n}={v}" for n, v in chosen.items())
            + (f" (mixtral's default{paging})" if ours else " (set by the user)"))


def _describe_count() -> str:
    try:
        mode = chosen()
    except ThreadsError as e:
        return str(e)
    if os.environ.get("OMP_NUM_THREADS") and not isinstance(mode, int):
        return f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} (set by the user)"
    return {"adaptive": "adaptive (as many as cores other processes leave free)",
            "fixed": "fixed, torch's count (the default, adaptive, follows a shared machine)"
            }.get(str(mode), f"{mode} ({ENV} or --threads)")


# --- the thread count ----------------------------------------------------------------------------

class ThreadsError(ValueError):
    """MIXTRAL_THREADS or --threads names no policy."""


def parse(value: str) -> str | int:
    """"adaptive", "fixed" or a positive count; ThreadsError otherwise."""
    text = value.strip().lower()
    if text in ("adaptive", "fixed"):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ThreadsError(f"{value!r} is not a thread policy: use adaptive, fixed or a count of "
                       "threads (1 or more)")


_chosen: str | int | None = None  # `mixtral serve --threads`, over the environment


def choose(value: str | int | None) -> None:
    """The policy every engine of this process uses from now on (None: the environment's)."""
    global _chosen
    _chosen = parse(str(value)) if value is not None else None


def chosen() -> str | int:
    """The policy in force: `choose`'s, else MIXTRAL_THREADS, else DEFAULT; ThreadsError if
    MIXTRAL_THREADS is invalid."""
    if _chosen is not None:
        return _chosen
    try:
        return parse(os.environ.get(ENV) or DEFAULT)
    except ThreadsError as e:
        raise ThreadsError(f"{ENV}={e}") from None


class Policy(Protocol):
    def between_steps(self) -> None: ...


class Fixed:
    """The count as torch has it, or `count` set once, on the engine's thread (OpenMP's count
    belongs to the thread that sets it)."""

    def __init__(self, count: int | None = None) -> None:
        self.count = count

    def between_steps(self) -> None:
        if self.count is not None:
            import torch

            torch.set_num_threads(self.count)
            self.count = None


def target(current: int, free: float, cap: int) -> int:
    """Threads for `free` cores, from `current`, at most `cap`: one fewer once others hold more
    than half a core of ours, one more only once they hold under a quarter (the band between
    keeps noise from flapping)."""
    down, up = math.floor(free + DOWN), math.floor(free + UP)
    want = down if down < current else max(current, up)
    return max(1, min(cap, want))


class Adaptive:
    """As many threads as cores are left to this process (see the module's docstring)."""

    def __init__(self, reader: Callable[[], cpu_share.Sample] | None = None,
                 interval: float = 1.0, confirm: int = 2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.read = reader  # built on first use: a process that never steps reads nothing
        self.interval, self.confirm, self.clock = interval, confirm, clock
        self.off: str | None = None  # why it no longer adapts
        self.ceiling: int | None = None  # torch's count when it started: the most it uses
        self._set: int | None = None  # the count last set (another count: the user's)
        self._last: cpu_share.Sample | None = None
        self._next = 0.0
        self._pending = (0, 0)  # (direction of the change proposed, windows in a row)

    def between_steps(self) -> None:
        """Cheap between windows (one clock read); never raises: a machine it cannot read
        turns it off, with one log line."""
        if self.off is not None or (now := self.clock()) < self._next:
            return
        self._next = now + self.interval
        import torch

        current = torch.get_num_threads()
        if self.ceiling is None:
            self.ceiling = self._set = current
        elif current != self._set:
            self._stop(f"the thread count was set to {current} by someone else")
            return
        try:
            if self.read is None:
                self.read = cpu_share.Reader().sample
            sample = self.read()
        except (OSError, ValueError, IndexError) as e:
            self._stop(f"cannot read the machine's CPU use ({type(e).__name__}: {e})")
            return
        last, self._last = self._last, sample
        cap = min(self.ceiling, sample.cap)
        if current > cap:  # a quota or affinity below the count: no need to wait
            self._apply(current, cap, f"{cap} cores allowed")
            return
        if last is None or not 0 < sample.at - last.at <= 4 * self.interval:
            return  # the first window, or one spanning an idle engine: only a baseline
        free = cpu_share.free(last, sample)
        want = target(current, free, cap)
        direction = (want > current) - (want < current)
        count = self._pending[1] + 1 if direction and direction == self._pending[0] else 1
        self._pending = (direction, count if direction else 0)
        if direction and count >= self.confirm:
            self._apply(current, want, f"{free:.2f} of {sample.cores} cores free")

    def _apply(self, current: int, count: int, why: str) -> None:
        import torch

        torch.set_num_threads(count)
        self._set, self._pending = count, (0, 0)
        log.info("threads %d -> %d (%s)", current, count, why)

    def _stop(self, why: str) -> None:
        self.off = why
        log.info("adaptive threads off: %s", why)


def policy() -> Policy:
    """What an engine steps between its steps: Adaptive, or Fixed where a count was chosen
    (OMP_NUM_THREADS is the user's count: it is never adapted)."""
    mode = chosen()
    if mode == "adaptive" and not os.environ.get("OMP_NUM_THREADS"):
        return Adaptive()
    return Fixed(mode if isinstance(mode, int) else None)
