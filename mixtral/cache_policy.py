"""Which expert the offloaded-experts cache (mixtral.offload) evicts when a new one must come in.

A policy sees every use of an expert (`touch`) and, when the cache is full, names the resident
expert to drop (`victim`). Every policy ranks experts by a tuple that ends in the expert's last
use, which no two experts share, so the choice is deterministic: the same uses evict the same
experts on every run (outputs never depend on the cache at all; the bytes read do, and those
are then reproducible too).

  lru    least recently used
  lfu    fewest uses so far (uses of experts since evicted are remembered: 256 counters for
         Mixtral), then least recently used
  aging  uses weighted by how recent they are: each use counts 1 and halves every `half_life`
         uses of the cache (a frequency that forgets), then least recently used; the default
         (mixtral.offload), chosen by measurement: as frugal as LFU on the traces measured,
         and unlike LFU it lets go of experts a past conversation favoured

`replay` runs a recorded routing trace through a policy at a capacity (in experts), as
benchmarks/cache_policy.py compares them; `belady` is the offline optimum (evict the expert
used again furthest in the future), the floor no policy can beat.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Key = tuple[int, int]  # (layer, expert)
POLICIES = ("lru", "lfu", "aging")
# aging's, in uses: 16 tokens of Mixtral (32 layers x 2 experts). On the full-size model's
# trace at 8 GiB, half-lives from 256 to 4096 read as little as LFU, 31 % below LRU; 64
# (one token) is LRU again (RESULTS.md, benchmarks/cache_policy.py)
HALF_LIFE = 1024


class Policy:
    """Least recently used; the others refine `rank`."""

    name = "lru"

    def __init__(self) -> None:
        self.clock = 0
        self.last: dict[Key, int] = {}

    def touch(self, key: Key) -> None:
        self.clock += 1
        self.last[key] = self.clock

    def rank(self, key: Key) -> tuple[float, ...]:
        return (self.last.get(key, 0),)

    def victim(self, resident: Iterable[Key]) -> Key:
        return min(resident, key=self.rank)


class LFU(Policy):
    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.uses: dict[Key, int] = {}

    def touch(self, key: Key) -> None:
        super().touch(key)
        self.uses[key] = self.uses.get(key, 0) + 1

    def rank(self, key: Key) -> tuple[float, ...]:
        return (self.uses.get(key, 0), self.last.get(key, 0))


class Aging(Policy):
    name = "aging"

    def __init__(self, half_life: float = HALF_LIFE) -> None:
        super().__init__()
        self.half_life = half_life
        self.score: dict[Key, float] = {}  # as of the key's last use

    def touch(self, key: Key) -> None:
        self.clock += 1
        self.score[key] = self.weight(key) + 1.0
        self.last[key] = self.clock

    def weight(self, key: Key) -> float:
        age = self.clock - self.last.get(key, self.clock)
        return self.score.get(key, 0.0) * 0.5 ** (age / self.half_life)

    def rank(self, key: Key) -> tuple[float, ...]:
        return (self.weight(key), self.last.get(key, 0))


def make(name: str, half_life: float = HALF_LIFE) -> Policy:
    """A policy by name (POLICIES); `half_life` in uses, for aging."""
    if name == "lru":
        return Policy()
    if name == "lfu":
        return LFU()
    if name == "aging":
        return Aging(half_life)
    raise ValueError(f"unknown cache policy {name!r}: choose one of {', '.join(POLICIES)}")


def replay(trace: Sequence[Key], capacity: int, policy: Policy, count_from: int = 0) -> int:
    """Misses of a cache of `capacity` experts under `policy` over the uses in `trace` (those
    from index `count_from` on: the earlier ones only warm the cache)."""
    resident: set[Key] = set()
    misses = 0
    for i, key in enumerate(trace):
        if key not in resident:
            misses += i >= count_from
            if len(resident) >= capacity:
                resident.discard(policy.victim(resident))
            resident.add(key)
        policy.touch(key)
    return misses


def belady(trace: Sequence[Key], capacity: int, count_from: int = 0) -> int:
    """Misses of the offline optimum: evict the expert whose next use is furthest away."""
    upcoming: list[int] = [0] * len(trace)
    seen: dict[Key, int] = {}
    for i in range(len(trace) - 1, -1, -1):
        upcoming[i] = seen.get(trace[i], len(trace))
        seen[trace[i]] = i
    resident: dict[Key, int] = {}  # key -> its next use
    misses = 0
    for i, key in enumerate(trace):
        if key not in resident:
            misses += i >= count_from
            if len(resident) >= capacity:
                del resident[max(resident, key=lambda k: (resident[k], k))]
        resident[key] = upcoming[i]
    return misses
