"""Which expert-cache policy reads least from the disk: a routing trace (every expert use of a
generation, recorded by benchmarks/offload.py --trace) replayed offline through each policy of
mixtral.cache_policy at the experts cache's capacity under each RAM budget, with the offline
optimum (Belady) as the floor no policy can beat.

    python benchmarks/cache_policy.py trace.json --model /tmp/bench-models/full-int4

Reports, per budget and policy, misses and disk bytes per decode token (a miss reads one
expert), and how skewed the routing is (share of the decode uses that go to the most used 10 %
of experts; 10 % is uniform). A replayed miss count equals the live cache's
(tests/test_offload.py checks it), so these are the bytes a run would read.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from mixtral.cache_policy import Aging, belady, make, replay
from mixtral.checkpoint import inspect
from mixtral.offload import plan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", type=Path)
    p.add_argument("--model", required=True, help="the checkpoint the trace came from")
    p.add_argument("--budgets", nargs="+", default=["16GiB", "8GiB", "4GiB"])
    p.add_argument("--half-lives", nargs="+", type=int, default=[64, 256, 1024, 4096],
                   help="aging's half-lives to try, in expert uses (64 = one token)")
    p.add_argument("--json", type=Path, help="write the table here too")
    a = p.parse_args()
    from mixtral.sizes import parse_size

    t = json.loads(a.trace.read_text())
    uses = [tuple(u) for u in t["uses"]]
    per_token = t["uses_per_token"]
    decode_tokens = t["tokens"] - 1  # the first token comes from the prefill
    start = len(uses) - decode_tokens * per_token  # the prompt's uses come first
    info = inspect(a.model)
    n_experts = info.args.n_layers * info.args.num_experts
    expert = sum(e.dtype.itemsize * _numel(e.shape) for n, e in info.entries.items()
                 if ".experts." in n) // n_experts
    counts = collections.Counter(uses[start:])
    top = sorted(counts.values(), reverse=True)[:max(1, n_experts // 10)]
    skew = sum(top) / (len(uses) - start)
    print(f"trace: {t['prompt_tokens']}-token prompt, {decode_tokens} decode tokens, "
          f"{len(counts)} of {n_experts} experts used in decode; top 10 % of experts take "
          f"{skew:.1%} of the decode uses (uniform: 10 %)")
    rows = []
    for budget in a.budgets:
        capacity = plan(info, parse_size(budget, "--budgets"))[1] // expert
        policies = [make("lru"), make("lfu")] + [Aging(h) for h in a.half_lives] \
            + [make("cycle")]
        for policy in policies:
            name = policy.name + (f"/{policy.half_life:g}" if isinstance(policy, Aging) else "")
            rows.append((budget, capacity, name, replay(uses, capacity, policy, start)))
        rows.append((budget, capacity, "belady (optimum)", belady(uses, capacity, start)))
    print(f"{'budget':>7} {'experts':>7} {'policy':>16} {'misses/token':>12} {'GB/token':>9}")
    for budget, capacity, name, misses in rows:
        print(f"{budget:>7} {capacity:>7} {name:>16} {misses / decode_tokens:>12.2f} "
              f"{misses * expert / decode_tokens / 1e9:>9.3f}")
    if a.json:
        a.json.write_text(json.dumps({"skew_top10": skew, "expert_bytes": expert, "rows": [
            {"budget": b, "experts": c, "policy": n, "misses_per_token": m / decode_tokens,
             "bytes_per_token": m * expert / decode_tokens} for b, c, n, m in rows]}, indent=1))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
