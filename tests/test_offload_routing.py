"""benchmarks/routing.py: the replayed routing has the Mixtral paper's repetition rates and
balanced loads, the offloaded model runs exactly the schedule's experts, and the predictor
guesses with the precision asked for."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests import test_offload
from tests.test_offload import ARGS
from tests.test_prefetch import budget, offload_bench

checkpoints = test_offload.checkpoints  # the fixture: its small q4/q8 checkpoints

BENCH = Path(__file__).parent.parent / "benchmarks"
_spec = importlib.util.spec_from_file_location("routing", BENCH / "routing.py")
assert _spec is not None and _spec.loader is not None
routing = importlib.util.module_from_spec(_spec)
sys.modules["routing"] = routing  # benchmarks/offload.py imports it by this name
_spec.loader.exec_module(routing)


def rates_of(pairs):
    first = sum(a[0] == b[0] for a, b in itertools.pairwise(pairs)) / (len(pairs) - 1)
    either = sum(bool(set(a) & set(b)) for a, b in itertools.pairwise(pairs)) / (len(pairs) - 1)
    return first, either


def test_the_schedule_has_table_5s_rates_and_balanced_loads():
    schedule = routing.Schedule(n_layers=3, n_experts=8)  # layers 0, 15 and 31 of 32
    for layer, (first, either) in enumerate(routing.TABLE5.values()):
        pairs = schedule.take(layer, 20_000)
        got_first, got_either = rates_of(pairs)
        assert got_first == pytest.approx(first, abs=0.01)
        assert got_either == pytest.approx(either, abs=0.025)
        loads = Counter(e for pair in pairs for e in pair)
        assert all(abs(n / 40_000 - 1 / 8) < 0.01 for n in loads.values()) and len(loads) == 8
        assert all(a != b for a, b in pairs)
    # random routing's rates, for contrast: the chain is not just uniform draws
    assert rates_of(schedule.take(1, 20_000))[0] > 0.2


def test_guesses_are_right_with_the_precision_asked_for():
    schedule = routing.Schedule(n_layers=2, n_experts=8, precision=0.6)
    pairs = schedule.peek(0, 10_000)
    guesses = schedule.guess(pairs)
    right = sum(e in pair for pair, guess in zip(pairs, guesses, strict=True)
                for e in guess) / 20_000
    assert right == pytest.approx(0.6, abs=0.015)
    assert all(a != b for a, b in guesses)
    assert schedule.take(0, 10_000) == pairs  # peeking did not move the stream


@pytest.mark.parametrize("prefetch", ["off", "on"])
def test_the_offloaded_model_runs_the_schedules_experts(checkpoints, prefetch):
    """Decode step by step, every layer's experts are the schedule's next pair (the trace, in
    the order FastMoe calls them: ascending), and the predictor's measured precision is the
    schedule's."""
    path = checkpoints / "q4"
    prompt, gen = 6, 12
    row = offload_bench.measure(str(path), str(budget(path, 4)), prompt, gen, 2, "lru",
                                prefetch, routing=0.5)
    schedule = routing.Schedule(ARGS.n_layers, ARGS.num_experts, precision=0.5)
    # every token passed through the model (the prompt, then each generated one but the last)
    streams = [schedule.take(layer, prompt + gen - 1) for layer in range(ARGS.n_layers)]
    per = ARGS.n_layers * ARGS.num_experts_per_tok
    uses = [tuple(u) for u in row["trace"]["uses"]]
    decoded = uses[len(uses) - (gen - 1) * per:]
    want = [(layer, e) for t in range(prompt, prompt + gen - 1)
            for layer in range(ARGS.n_layers) for e in sorted(streams[layer][t])]
    assert decoded == want
    assert row["routing_replayed"] and row["routing"]["distinct_ids"] > 0
    if prefetch == "on":
        assert row["prefetch_precision"] == pytest.approx(0.5, abs=0.2)


@pytest.mark.parametrize("precision", [0.0, 1.0])
def test_guesses_are_read_only_while_they_are_precise(checkpoints, precision):
    """The predictor reads its next-layer guesses only while their recent precision is at least
    MIN_PRECISION (a wrong guess's read delays the reads the model needs): all wrong, it stops
    asking once the moving average falls under it; all right, it asks at every layer but the
    last. The current layer's own experts are read ahead either way."""
    from mixtral.offload import load_offloaded
    from mixtral.prefetch import MIN_PRECISION

    path = checkpoints / "q4"
    model = load_offloaded(path, budget(path, 6), prefetch=True)
    cache = model.expert_cache
    routing.replay(model, routing.Schedule(ARGS.n_layers, ARGS.num_experts, precision=precision))
    calls: list[bool] = []
    prefetch = cache.prefetch
    cache.prefetch = lambda keys, guesses=False: (keys and calls.append(guesses),
                                                  prefetch(keys, guesses))
    with torch.inference_mode():
        for _ in range(40):  # one token at a time, as decoding does
            model(torch.tensor([[5]]))
    sight = cache.foresight
    late = calls[len(calls) // 2:]
    assert late.count(False) == len(late) - late.count(True) > 0  # the current layer's, always
    if precision == 0.0:
        assert sight.recent_precision < MIN_PRECISION and True not in late
    else:
        assert sight.recent_precision == 1.0
        assert late.count(True) == late.count(False) * (ARGS.n_layers - 1) / ARGS.n_layers
