"""The full-size model under RAM budgets, measured honestly (issue 16): each budget in its own
process inside a memory cgroup (mixtral.cgroup: the limit counts the page cache), the
checkpoint's cached pages dropped first, and the disk's own direct sequential read speed
measured in the same run, so each row can say how close it comes to the disk's roof.

    python benchmarks/offload.py /tmp/bench-models/full-int4 --out offload.json \
        --trace trace.json
    python benchmarks/offload.py MODEL --budgets 16GiB:24 --prefetch on off --profile --out p.json

Per budget (a short prompt, then greedy decoding or `--temperature T` sampling; the first tokens
warm the cache): decode
tok/s, disk bytes/token from /proc/self/io (what reached the disk) beside the experts read
(misses x expert size), the expert cache's hit rate, peaks, and the disk roof = read speed /
bytes per token. `mixtral bench --max-ram` measures the same way but runs three 16-token
prefills first, which at a small budget read the whole model each. `--trace` writes the
routing trace (every expert use, in order) for benchmarks/cache_policy.py. Timings on a shared
machine are noisy; bytes per token and hit rates are not.

Each row also holds `profile`, where a measured token's time went (mixtral.prefetch.Profile), per
token: the caller thread's read (the syscall), drop (the page-cache drop), pack (file layout ->
the kernels'), wait (for a read the reader has in flight) and compute (the experts), `rest_s`
(attention, routers, sampling, Python: the wall time none of those took), and the reader
thread's own read/drop/pack; with counts per token. `--prefetch on guess evict off` runs each
budget with the background reader (the next layer's guesses are read only while at least
mixtral.prefetch.MIN_PRECISION of them are right, and evict only while the cache misses more
than it hits), with guesses read however imprecise, with guesses that always may evict, and
without it; `--read
direct|buffered|both` reads experts with O_DIRECT (the default), through the page cache
(dropped after each read), or each both ways; `--pool on|off|both` reuses evicted experts'
read buffers or frees them; `--profile` prints the split as a table.

Each row's `routing` says how much the decoded tokens' routing repeats itself (a cache's
friend): the random full-size model sends nearly every token of a layer to the same two
experts, so its own routing flatters every budget. `--mixtral-routing PRECISION` replays a
routing with a real Mixtral's statistics instead (benchmarks/routing.py: the paper's
consecutive-token repetition rates, balanced loads), the predictor right with PRECISION.
"""

from __future__ import annotations

import argparse
import itertools
import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from mixtral import threads
from mixtral.cgroup import remove_left

if TYPE_CHECKING:
    from mixtral.offload import ExpertCache

threads.set_policy(paging=True)  # as a command given --max-ram has it, before torch starts

CHUNK = 16 * 2**20


def direct_read_speed(path: Path, limit: int = 4 * 2**30) -> float:
    """Bytes/s of one sequential O_DIRECT read of up to `limit` bytes of `path` (no page cache:
    what a miss costs)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    done = 0
    try:
        start = time.perf_counter()
        while done < limit:
            got = os.readv(fd, [buf])
            if got <= 0:
                break
            done += got
        return done / (time.perf_counter() - start)
    finally:
        os.close(fd)
        buf.close()


def one(model: str, budget: str, prompt_len: int, gen_len: int, skip: int, policy: str,
        prefetch: str, direct: bool, pool: bool, temperature: float,
        routing: float | None) -> None:
    """Child process: one budget measured inside its cgroup; JSON on stdout."""
    from mixtral.cgroup import confine
    from mixtral.offload import drop_page_cache
    from mixtral.sizes import parse_size

    with confine(parse_size(budget, "--max-ram")) as limit:
        drop_page_cache(model)
        out = measure(model, budget, prompt_len, gen_len, skip, policy, prefetch, direct,
                      pool, temperature, routing)
        out["memory_limit"] = limit.report()
    print(json.dumps(out))


def measure(model: str, budget: str, prompt_len: int, gen_len: int, skip: int,
            policy: str = "cycle", prefetch: str = "on", direct: bool = True,
            pool: bool = True, temperature: float = 0.0,
            routing: float | None = None) -> dict:
    """One budget, in this process: a `prompt_len` prompt, then `gen_len` tokens (greedy, or
    sampled at `temperature` with a fixed seed); the figures are over the tokens after the
    first `skip` (the cache warmed up), and the routing trace covers them all. `direct`: the
    expert store's O_DIRECT reads (False: through the page cache, dropped after each read).
    `routing`: replay benchmarks/routing.py's schedule of a real Mixtral's routing statistics,
    the predictor guessing right with this precision (None: the model's own routers)."""
    import torch

    from mixtral.assemble import assemble
    from mixtral.bench import counters, peak_rss_gib, prompt_ids
    from mixtral.generate import GenerationParams, generate

    start = time.perf_counter()
    m = assemble(model, max_ram=budget, cache_policy=policy, prefetch=prefetch != "off")
    load_s = time.perf_counter() - start
    cache = cast("ExpertCache", m.expert_cache)  # set by mixtral.offload.load_offloaded
    cache.store.direct = direct
    if not pool:
        cache.store.POOL = 0
    if prefetch == "evict":  # guesses may evict whatever the cache's hit rate
        cache.guess_evict_below = float("inf")
    if prefetch == "guess" and cache.foresight is not None:  # guesses read however imprecise
        cache.foresight.min_precision = 0.0
    cache.trace = []
    if routing is not None:
        from routing import Schedule, replay
        replay(m, Schedule(m.args.n_layers, m.args.num_experts, precision=routing))
    prompt = prompt_ids(prompt_len, 7, m.args.vocab_size)
    marks, ids = [], []
    params = GenerationParams(max_tokens=gen_len, min_tokens=gen_len, temperature=temperature,
                              seed=0)
    with torch.inference_mode():
        for token in generate(m, prompt, params):
            ids.append((token, len(cache.trace)))
            marks.append((time.perf_counter(), counters(m), cache.profile.snapshot(),
                          cache.waited, cache.prefetched, cache.prefetch_used))
    (t0, c0, p0, *x0), (t1, c1, p1, *x1) = marks[skip], marks[-1]
    n = len(marks) - 1 - skip
    uses = c1.hits + c1.misses - c0.hits - c0.misses
    waited, prefetched, used = (b - a for a, b in zip(x0, x1, strict=True))
    foresight = cache.foresight
    out: dict[str, Any] = {
        "budget": budget, "memory_limit": None, "load_s": round(load_s, 1),
        "prompt_len": prompt_len, "gen_len": gen_len, "measured_tokens": n,
        "decode_tok_s": round(n / (t1 - t0), 3),
        "decode_disk_read_bytes_per_token": None if c0.read_bytes is None else
        round((cast(int, c1.read_bytes) - c0.read_bytes) / n),  # both from /proc/self/io
        "decode_expert_hit_rate": round((c1.hits - c0.hits) / uses, 4),
        "store_bytes_per_token": None, "peak_rss_gib": round(peak_rss_gib(), 2),
        "cache_experts": len(cache._held), "policy": cache.policy.name, "prefetch": prefetch,
        "reads": "direct" if direct else "buffered", "pool": pool,
        "prefetch_precision": None if foresight is None or foresight.precision() is None
        else round(cast(float, foresight.precision()), 4),
        "waited_per_token": round(waited / n, 2),
        "prefetched_per_token": round(prefetched / n, 2),
        "prefetch_used": round(used / prefetched, 4) if prefetched else None,
        "expert_bytes": cache.store.expert_bytes,
        "profile": split(p0, p1, t1 - t0, n), "temperature": temperature,
        "routing_replayed": routing is not None,
        "routing": skew([cache.trace[a:b] for (_, a), (_, b) in itertools.pairwise(ids)],
                        [token for token, _ in ids]),
        "trace": {"prompt_tokens": prompt_len, "tokens": len(marks),
                  "uses_per_token": m.args.n_layers * m.args.num_experts_per_tok,
                  "uses": cache.trace}}
    reads = c1.misses - c0.misses - waited + prefetched  # what the store read (both threads)
    out["store_bytes_per_token"] = round(reads * out["expert_bytes"] / n)
    return out


def skew(tokens: list[list], ids: list[int]) -> dict:
    """How much the decoded tokens' routing repeats itself, which flatters a cache: the share
    of distinct ids among the generated tokens (a greedy random model falls into a loop), how
    many of a layer's experts the decode steps touched on average, and the share of decode
    steps whose whole routing (every layer's chosen pair) an earlier step had already used.
    `tokens`: each decode step's expert uses, (layer, expert) keys."""
    by_layer: dict = {}
    seen: set = set()
    repeats = 0
    for uses in tokens:
        for layer, expert in uses:
            by_layer.setdefault(layer, set()).add(expert)
        key = frozenset(uses)
        repeats += key in seen
        seen.add(key)
    return {"distinct_ids": round(len(set(ids)) / len(ids), 3),
            "experts_touched_per_layer": round(sum(map(len, by_layer.values()))
                                               / max(len(by_layer), 1), 2),
            "tokens_with_a_seen_routing": round(repeats / max(len(tokens), 1), 3)}


def split(before: dict, after: dict, wall: float, tokens: int) -> dict:
    """Per token: the wall time, each thread's seconds and counts by stage
    (mixtral.prefetch.STAGES), and the caller's rest (what no stage took)."""
    out: dict = {"wall_s": round(wall / tokens, 5)}
    for who in ("caller", "reader"):
        out[who] = {stage: round((after[who][stage][0] - before[who][stage][0]) / tokens, 5)
                    for stage in after[who]}
        out[who + "_counts"] = {
            stage: round((after[who][stage][1] - before[who][stage][1]) / tokens, 2)
            for stage in after[who]}
    out["rest_s"] = round(out["wall_s"] - sum(out["caller"].values()), 5)
    return out


def show(row: dict) -> str:
    """The profile of a row as a few lines of text (--profile)."""
    p = row["profile"]
    lines = [f"{row['budget']} prefetch {row['prefetch']}, "
             f"{row['reads']} reads, pool {'on' if row['pool'] else 'off'}: "
             f"{p['wall_s'] * 1000:.1f} ms a token ({row['decode_tok_s']} tok/s)"]
    for who in ("caller", "reader"):
        parts = [f"{stage} {p[who][stage] * 1000:.1f} ms ({p[who + '_counts'][stage]:g}x)"
                 for stage in p[who]]
        lines.append(f"  {who:<6} " + ", ".join(parts))
    lines.append(f"  rest   {p['rest_s'] * 1000:.1f} ms (attention, routers, sampling, Python)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--budgets", nargs="+", default=["16GiB:48", "8GiB:32", "4GiB:12"],
                   help="BUDGET:TOKENS, the tokens generated under each")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--skip", type=int, default=4, help="warm-up tokens, not measured")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--trace", type=Path, help="write the first budget's routing trace here")
    p.add_argument("--policy", default="cycle",
                   help="the experts cache's: cycle, aging, lfu, lru")
    p.add_argument("--prefetch", nargs="+", choices=["on", "guess", "evict", "off"],
                   default=["on", "off"], help="each budget run with the background reader "
                   "(on: the next layer's guesses may evict while the cache misses more than "
                   "it hits, and are read at all only while they are precise), with guesses "
                   "read however imprecise (guess), with guesses that always may evict "
                   "(evict), without it (off)")
    p.add_argument("--read", choices=["direct", "buffered", "both"], default="direct",
                   help="expert reads with O_DIRECT, through the page cache, or each both ways")
    p.add_argument("--pool", choices=["on", "off", "both"], default="on",
                   help="evicted experts' read buffers reused (on), freed (off), or both ways")
    p.add_argument("--profile", action="store_true",
                   help="print where a token's time goes (each row's `profile`)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sample at this temperature (seed 0) instead of greedy decoding: a "
                   "random model's greedy tokens fall into a loop whose routing repeats")
    p.add_argument("--mixtral-routing", type=float, metavar="PRECISION",
                   help="replay a routing with a real Mixtral's statistics "
                   "(benchmarks/routing.py) instead of the model's own, the predictor right "
                   "with this precision (e.g. 0.66)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        budget, tokens, prefetch, read, pool = a.one.split(":")
        return one(a.model, budget, a.prompt_len, int(tokens), a.skip, a.policy,
                   prefetch, read == "direct", pool == "on", a.temperature, a.mixtral_routing)
    shard = max(Path(a.model).glob("*.safetensors"), key=lambda f: f.stat().st_size)
    speed = [direct_read_speed(shard)]
    print(f"direct sequential read: {speed[0] / 1e6:.0f} MB/s", file=sys.stderr)
    rows = []
    runs = [f"{b}:{p}:{r}:{q}" for b in a.budgets
            for p in a.prefetch
            for r in (("direct", "buffered") if a.read == "both" else (a.read,))
            for q in (("on", "off") if a.pool == "both" else (a.pool,))]
    for budget in runs:
        child = subprocess.Popen([sys.executable, __file__, a.model, "--one", budget,
                                  "--prompt-len", str(a.prompt_len), "--skip", str(a.skip),
                                  "--policy", a.policy, "--out", str(a.out),
                                  "--temperature", str(a.temperature)]
                                 + (["--mixtral-routing", str(a.mixtral_routing)]
                                    if a.mixtral_routing is not None else []),
                                 stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        stdout, stderr = child.communicate()
        if child.returncode != 0:  # -9: the cgroup's OOM killer; its cgroup is left behind
            remove_left(child.pid)
            print(f"{budget}: exit {child.returncode}\n{stderr[-2000:]}", file=sys.stderr)
            rows.append({"budget": budget, "exit": child.returncode})
            continue
        row = json.loads(stdout.splitlines()[-1])
        trace = row.pop("trace")
        if a.trace and not a.trace.exists():
            a.trace.write_text(json.dumps(trace))
        read = row["decode_disk_read_bytes_per_token"]
        row["disk_roof_tok_s"] = round(speed[0] / read, 3) if read else None
        rows.append(row)
        print(show(row) if a.profile else json.dumps(row), file=sys.stderr)
        a.out.write_text(json.dumps({"direct_read_bytes_s": [round(s) for s in speed],
                                     "rows": rows}, indent=1))
    speed.append(direct_read_speed(shard))
    a.out.write_text(json.dumps({"direct_read_bytes_s": [round(s) for s in speed],
                                 "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
