"""The full-size model under RAM budgets, measured honestly (issue 16): each budget in its own
process inside a memory cgroup (mixtral.cgroup: the limit counts the page cache), the
checkpoint's cached pages dropped first, and the disk's own direct sequential read speed
measured in the same run, so each row can say how close it comes to the disk's roof.

    python benchmarks/offload.py /tmp/bench-models/full-int4 --out offload.json \
        --trace trace.json

Per budget (a short prompt, then greedy decoding; the first tokens warm the cache): decode
tok/s, disk bytes/token from /proc/self/io (what reached the disk) beside the experts read
(misses x expert size), the expert cache's hit rate, peaks, and the disk roof = read speed /
bytes per token. `mixtral bench --max-ram` measures the same way but runs three 16-token
prefills first, which at a small budget read the whole model each. `--trace` writes the
routing trace (every expert use, in order) for benchmarks/cache_policy.py. Timings on a shared
machine are noisy; bytes per token and hit rates are not.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

from mixtral.cgroup import remove_left

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


def one(model: str, budget: str, prompt_len: int, gen_len: int, skip: int) -> None:
    """Child process: one budget measured inside its cgroup; JSON on stdout. A `prompt_len`
    prompt, then `gen_len` greedy tokens; the figures are over the tokens after the first
    `skip` (the cache warmed up), and the routing trace covers them all."""
    import torch

    from mixtral.assemble import assemble
    from mixtral.bench import counters, peak_rss_gib, prompt_ids
    from mixtral.cgroup import confine
    from mixtral.generate import GenerationParams, generate
    from mixtral.offload import drop_page_cache
    from mixtral.sizes import parse_size

    with confine(parse_size(budget, "--max-ram")) as limit:
        drop_page_cache(model)
        start = time.perf_counter()
        m = assemble(model, max_ram=budget)
        load_s = time.perf_counter() - start
        cache = m.expert_cache  # type: ignore[attr-defined]
        cache.trace = []
        prompt = prompt_ids(prompt_len, 7, m.args.vocab_size)
        marks = []
        with torch.inference_mode():
            for _ in generate(m, prompt, GenerationParams(max_tokens=gen_len,
                                                           min_tokens=gen_len)):
                marks.append((time.perf_counter(), counters(m)))
        (t0, c0), (t1, c1) = marks[skip], marks[-1]
        n = len(marks) - 1 - skip
        uses = c1.hits + c1.misses - c0.hits - c0.misses
        out = {
            "budget": budget, "memory_limit": limit.report(), "load_s": round(load_s, 1),
            "prompt_len": prompt_len, "gen_len": gen_len, "measured_tokens": n,
            "decode_tok_s": round(n / (t1 - t0), 3),
            "decode_disk_read_bytes_per_token": round((c1.read_bytes - c0.read_bytes) / n),
            "decode_expert_hit_rate": round((c1.hits - c0.hits) / uses, 4),
            "store_bytes_per_token": None, "peak_rss_gib": round(peak_rss_gib(), 2),
            "cache_experts": len(cache._held), "policy": cache.policy.name,
            "expert_bytes": cache.used // max(len(cache._held), 1),
            "trace": {"prompt_tokens": prompt_len, "tokens": len(marks),
                      "uses_per_token": m.args.n_layers * m.args.num_experts_per_tok,
                      "uses": cache.trace}}
        out["store_bytes_per_token"] = round((c1.misses - c0.misses) * out["expert_bytes"] / n)
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--budgets", nargs="+", default=["16GiB:48", "8GiB:32", "4GiB:12"],
                   help="BUDGET:TOKENS, the tokens generated under each")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--skip", type=int, default=4, help="warm-up tokens, not measured")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--trace", type=Path, help="write the first budget's routing trace here")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        budget, tokens = a.one.split(":")
        return one(a.model, budget, a.prompt_len, int(tokens), a.skip)
    shard = max(Path(a.model).glob("*.safetensors"), key=lambda f: f.stat().st_size)
    speed = [direct_read_speed(shard)]
    print(f"direct sequential read: {speed[0] / 1e6:.0f} MB/s", file=sys.stderr)
    rows = []
    for budget in a.budgets:
        child = subprocess.Popen([sys.executable, __file__, a.model, "--one", budget,
                                  "--prompt-len", str(a.prompt_len), "--skip", str(a.skip),
                                  "--out", str(a.out)], stdout=subprocess.PIPE,
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
        print(json.dumps(row), file=sys.stderr)
        a.out.write_text(json.dumps({"direct_read_bytes_s": [round(s) for s in speed],
                                     "rows": rows}, indent=1))
    speed.append(direct_read_speed(shard))
    a.out.write_text(json.dumps({"direct_read_bytes_s": [round(s) for s in speed],
                                 "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
