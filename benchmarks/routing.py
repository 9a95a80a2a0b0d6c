"""A routing schedule with a real Mixtral's statistics, replayed on a model whose own routers
lack them, so that an offloading benchmark's cache sees the misses a real model would cause
(issue 16).

Why: the full-size random model (benchmarks/make_full_random.py) routes almost every token of
a layer to the same two experts (2.2 of 8 touched over 48 sampled tokens; greedy decoding also
falls into a two-token loop), so its expert cache hits far more than a real Mixtral's would.
The real model's statistics, from the Mixtral paper's Table 5 (means over its 8 domains; the
shared reference's evaluation-anchors.md §3.2): loads near-balanced over the 8 experts, and
consecutive tokens keep their first-choice expert 14.1 % / 26.4 % / 22.7 % of the time at
layers 0 / 15 / 31 (random: 12.5 %), and share at least one of their two 48.0 % / 63.8 % /
51.0 % (random: 46.4 %). The schedule is a Markov chain per layer with exactly those rates
(interpolated linearly between the three layers) and uniform loads; the experts' compute is the
model's own, only which experts run is replayed.

The predictor (mixtral.prefetch.Foresight) guesses the next layer's pair from the schedule
with each guessed expert wrong (another expert, at random) with probability 1 - `precision`:
a real model's one-layer-ahead precision is not known here; the trained default model's is
0.66 (benchmarks/prefetch_precision.py), the random full-size model's 0.97.

    python benchmarks/routing.py --tokens 2000 --out trace.json   # for cache_policy.py
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

# layer -> (first choice kept, either of the two shared) between consecutive tokens
TABLE5 = {0: (0.141, 0.480), 15: (0.264, 0.638), 31: (0.227, 0.510)}


def rates(layer: int, n_layers: int) -> tuple[float, float]:
    """Table 5's two repetition rates at `layer` of `n_layers`, mapped onto Mixtral's 32 and
    interpolated linearly between layers 0, 15 and 31."""
    at = 31 * layer / max(n_layers - 1, 1)
    (x0, r0), (x1, r1) = ((0, TABLE5[0]), (15, TABLE5[15])) if at <= 15 else \
        ((15, TABLE5[15]), (31, TABLE5[31]))
    w = (at - x0) / (x1 - x0)
    return r0[0] + w * (r1[0] - r0[0]), r0[1] + w * (r1[1] - r0[1])


def step(prev: tuple[int, int], keep: float, share: float, n: int,
         rng: random.Random) -> tuple[int, int]:
    """The next token's (first, second) from the previous one's: the first stays with
    probability `keep`, else is drawn uniformly (and may still land on the same one); the
    second is one of the previous pair (other than the new first) with probability `share`,
    else uniform over the experts other than the first. Symmetric, so loads stay uniform."""
    first = prev[0] if rng.random() < keep else rng.randrange(n)
    olds = [e for e in prev if e != first]
    if olds and rng.random() < share:
        second = rng.choice(olds)
    else:
        second = rng.choice([e for e in range(n) if e != first])
    return first, second


def calibrate(first: float, either: float, n: int = 8, draws: int = 20_000) -> tuple[float, float]:
    """(keep, share) of `step` that give first-choice repetition `first` and either-shared
    `either`: keep in closed form, share by bisection on a fixed-seed simulation."""
    keep = max(0.0, (first - 1 / n) / (1 - 1 / n))

    def measured(share: float) -> float:
        rng, pair, hits = random.Random(0), (0, 1), 0
        for _ in range(draws):
            nxt = step(pair, keep, share, n, rng)
            hits += bool(set(nxt) & set(pair))
            pair = nxt
        return hits / draws

    lo, hi = 0.0, 1.0
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if measured(mid) < either else (lo, mid)
    return keep, (lo + hi) / 2


class Schedule:
    """Per layer, a stream of (first, second) experts drawn by `step` from a fixed seed; the
    router hooks take from it in order (one pair a routed token), the predictor peeks."""

    def __init__(self, n_layers: int, n_experts: int, precision: float = 0.66,
                 seed: int = 0) -> None:
        self.n, self.precision = n_experts, precision
        self.params = [calibrate(*rates(i, n_layers), n=n_experts) for i in range(n_layers)]
        self.rngs = [random.Random(seed * 1000 + i) for i in range(n_layers)]
        self.noise = random.Random(seed + 7)
        self.last = [(0, 1)] * n_layers
        self.queued: list[list[tuple[int, int]]] = [[] for _ in range(n_layers)]

    def peek(self, layer: int, count: int) -> list[tuple[int, int]]:
        q = self.queued[layer]
        while len(q) < count:
            keep, share = self.params[layer]
            self.last[layer] = step(self.last[layer], keep, share, self.n, self.rngs[layer])
            q.append(self.last[layer])
        return q[:count]

    def take(self, layer: int, count: int) -> list[tuple[int, int]]:
        pairs = self.peek(layer, count)
        del self.queued[layer][:count]
        return pairs

    def guess(self, pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Each expert of each pair kept with probability `precision`, else another one."""
        out = []
        for pair in pairs:
            picked: list[int] = []
            for e in pair:
                if self.noise.random() >= self.precision:
                    e = self.noise.choice([o for o in range(self.n) if o not in pair
                                           and o not in picked])
                picked.append(e)
            out.append((picked[0], picked[1]))
        return out

    def logits(self, pairs: list[tuple[int, int]], like: Tensor) -> Tensor:
        """Router logits [len(pairs), E] whose top-2 is each pair (first above second)."""
        out = torch.zeros(len(pairs), self.n, dtype=like.dtype, device=like.device)
        for row, (first, second) in enumerate(pairs):
            out[row, first], out[row, second] = 2.0, 1.0
        return out


def replay(model: nn.Module, schedule: Schedule) -> list:
    """Route `model` by the schedule: a hook on every router replaces its logits, and the
    predictor (if the model has one) sees the same schedule. -> the hook handles."""
    handles = []
    for i, block in enumerate(cast(nn.ModuleList, model.layers)):
        def hook(_m: nn.Module, _inputs: object, out: Tensor, layer: int = i) -> Tensor:
            rows = out.reshape(-1, out.shape[-1])
            return schedule.logits(schedule.take(layer, rows.shape[0]), rows).view(out.shape)
        gate = cast(nn.Module, block.feed_forward.gate)  # type: ignore[union-attr]
        handles.append(gate.register_forward_hook(hook))
    foresight = getattr(getattr(model, "expert_cache", None), "foresight", None)
    if foresight is not None:
        def logits(layer: int, x: Tensor, ahead: bool) -> Tensor:
            pairs = schedule.peek(layer, x.shape[0])
            return schedule.logits(schedule.guess(pairs) if ahead else pairs, x)
        foresight.logits = logits
    return handles


def trace(n_layers: int, n_experts: int, tokens: int, seed: int = 0) -> dict:
    """A decode-only routing trace of `tokens` tokens in benchmarks/offload.py's --trace format
    (every layer's pair in ascending order, as the offloaded model uses them)."""
    schedule = Schedule(n_layers, n_experts, seed=seed)
    streams = [schedule.take(layer, tokens) for layer in range(n_layers)]
    uses = [(layer, e) for t in range(tokens) for layer in range(n_layers)
            for e in sorted(streams[layer][t])]
    return {"prompt_tokens": 0, "tokens": tokens + 1, "uses_per_token": 2 * n_layers,
            "uses": uses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    a.out.write_text(json.dumps(trace(a.layers, a.experts, a.tokens)))


if __name__ == "__main__":
    main()
