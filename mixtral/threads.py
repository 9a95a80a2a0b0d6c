"""How PyTorch's OpenMP threads wait between parallel regions, set once before torch starts.

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
a shared machine gets 1.4-1.7x the default's int4 speed. Where the machine is known to be
shared, OMP_WAIT_POLICY=PASSIVE (or GOMP_SPINCOUNT=1000) gives 2.5x the default there and
costs ~half the quiet speed. A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT always wins, and
neither has any effect once torch has started (import mixtral first; the CLI does).
"""

from __future__ import annotations

import os
import sys

SPINCOUNT = "10000"
_USER = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def set_policy() -> None:
    """Our default wait policy, unless the user chose one or torch has started already (its
    OpenMP runtime read the environment then); mixtral/__init__.py calls it first."""
    if "torch" not in sys.modules and not any(os.environ.get(name) for name in _USER):
        os.environ["GOMP_SPINCOUNT"] = SPINCOUNT


def describe() -> str:
    """The wait policy in force, for `mixtral info --system`."""
    chosen = {n: os.environ[n] for n in _USER if os.environ.get(n)}
    if not chosen:
        return "GOMP's default spin (torch started before mixtral set GOMP_SPINCOUNT)"
    ours = chosen == {"GOMP_SPINCOUNT": SPINCOUNT}
    return (", ".join(f"{n}={v}" for n, v in chosen.items())
            + (" (mixtral's default; OMP_WAIT_POLICY=PASSIVE on a shared machine)" if ours
               else " (set by the user)"))
