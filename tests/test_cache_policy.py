"""mixtral.cache_policy: each policy's misses on traces worked out by hand, the offline optimum
as their floor, and deterministic choices."""

from __future__ import annotations

import random

import pytest

from mixtral.cache_policy import POLICIES, Aging, Cycle, belady, make, replay

A, B, C, D = (0, 0), (0, 1), (1, 0), (1, 1)
# A is used often early; then B and C alternate: recency says keep B, C; frequency says keep A
TRACE = [A, A, A, B, C, B, C, B, C, A]


def test_misses_worked_out_by_hand():
    assert replay(TRACE, 2, make("lru")) == 4  # A B C ... A
    assert replay(TRACE, 2, make("lfu")) == 8  # B and C evict each other while A holds on
    assert belady(TRACE, 2) == 4
    assert replay([A, B, A, C, B, D, A], 2, make("lru")) == 6
    assert replay(TRACE, 3, make("lfu")) == 3  # everything fits: only first uses miss


def test_aging_spans_lru_to_lfu():
    assert replay(TRACE, 2, Aging(half_life=0.1)) == replay(TRACE, 2, make("lru"))
    assert replay(TRACE, 2, Aging(half_life=10**9)) == replay(TRACE, 2, make("lfu"))


def test_cycle_keeps_the_layers_that_come_next():
    """One expert in each of 5 layers, used in layer order three times, with room for 4: LRU,
    LFU and aging miss every use (each evicts the one wanted next); cycle evicts the expert
    just used (its layer comes round last) and misses once a pass after the first, as the
    optimum does: 5 + 1 + 1."""
    trace = [(layer, 0) for layer in range(5)] * 3
    for name in ("lru", "lfu", "aging"):
        assert replay(trace, 4, make(name)) == 15
    assert replay(trace, 4, make("cycle")) == 7 == belady(trace, 4)
    cycle = Cycle()
    for key in trace[:3]:
        cycle.touch(key)
    assert cycle.layers == 3 and cycle.now == 2
    # one use each, so the weights tie but for age: the layer in use (2) ranks highest, then
    # the one that comes next (0), then the one just done (1)
    assert cycle.rank((2, 0)) > cycle.rank((0, 0)) > cycle.rank((1, 0))


@pytest.mark.parametrize("name", POLICIES)
def test_no_policy_beats_the_optimum_and_each_is_deterministic(name):
    rng = random.Random(0)
    trace = [(rng.randrange(4), min(rng.randrange(8), rng.randrange(8))) for _ in range(3000)]
    for capacity in (2, 8, 20):
        misses = replay(trace, capacity, make(name))
        assert belady(trace, capacity) <= misses == replay(trace, capacity, make(name))
        assert misses >= len(set(trace))


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown cache policy 'fifo': choose one of lru, lfu"):
        make("fifo")


def test_warm_up_uses_are_not_counted():
    # LRU and the optimum miss at uses 0, 3, 4 and 9; from use 5 on only the last counts
    assert replay(TRACE, 2, make("lru"), count_from=5) == 1 == belady(TRACE, 2, count_from=5)
