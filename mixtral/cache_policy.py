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
         uses of the cache (a frequency that forgets), then least recently used: as frugal as
         LFU on the random model's own traces, and unlike LFU it lets go of experts a past
         conversation favoured
  cycle  aging's weight less half the number of layers until the expert's layer comes round
         again: the layers run in order, so at layer l an expert of layer l+1 is wanted
         within a layer and one of layer l-1 not before the next token (one of layer l may
         be wanted now: a use is counted before its miss evicts, live and in `replay`). The
         default (mixtral.offload), chosen by measurement on two kinds of trace at 16/8/4 GiB, the
         random full-size model's own skewed routing and a replay of a real Mixtral's routing
         statistics (benchmarks/routing.py): against aging it reads 6 / 3 / 1 % less on the
         replay at 16 / 8 / 4 GiB and 30 % less at 4 GiB on the random model's own trace
         (the same at 16 GiB, 1 % more at 8); LRU reads 3-5 % less than it at 8 GiB but at
         4 GiB misses every use, a loop one bigger than the cache (RESULTS.md)

`replay` runs a recorded routing trace through a policy at a capacity (in experts), as
benchmarks/cache_policy.py compares them; `belady` is the offline optimum (evict the expert
used again furthest in the future), the floor no policy can beat.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Key = tuple[int, int]  # (layer, expert)
POLICIES = ("lru", "lfu", "aging", "cycle")
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


class Cycle(Aging):
    name = "cycle"

    def __init__(self, half_life: float = HALF_LIFE) -> None:
        super().__init__(half_life)
        self.layers = 1  # the model's, as the uses show it
        self.now = 0  # the layer in use

    def touch(self, key: Key) -> None:
        super().touch(key)
        self.now, self.layers = key[0], max(self.layers, key[0] + 1)

    def rank(self, key: Key) -> tuple[float, ...]:
        # layers until it can be wanted again: 0 for the layer in use (its other expert may be
        # next), 1 for the next layer, ... the most for the layer just done
        ahead = (key[0] - self.now) % self.layers
        return (self.weight(key) - ahead / 2, self.last.get(key, 0))


def make(name: str, half_life: float = HALF_LIFE) -> Policy:
    """A policy by name (POLICIES); `half_life` in uses, for aging and cycle."""
    if name == "lru":
        return Policy()
    if name == "lfu":
        return LFU()
    if name == "aging":
        return Aging(half_life)
    if name == "cycle":
        return Cycle(half_life)
    raise ValueError(f"unknown cache policy {name!r}: choose one of {', '.join(POLICIES)}")


def replay(trace: Sequence[Key], capacity: int, policy: Policy, count_from: int = 0) -> int:
    """Misses of a cache of `capacity` experts under `policy` over the uses in `trace` (those
    from index `count_from` on: the earlier ones only warm the cache)."""
    resident: set[Key] = set()
    misses = 0
    for i, key in enumerate(trace):
        policy.touch(key)  # before the eviction, as the live cache does (mixtral.offload)
        if key not in resident:
            misses += i >= count_from
            if len(resident) >= capacity:
                resident.discard(policy.victim(resident))
            resident.add(key)
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
