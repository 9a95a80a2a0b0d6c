"""Decode speed and memory per rank: one process vs two (tensor / expert / both) on the bench
model, on the same cores, so that the cost of communication shows.

    python benchmarks/parallel.py [--model bench] [--quant fp32] [--batch 1,8] [--rounds 3]
                                  [--device cpu] [--gen-len 64] [--prompt-len 256]
                                  [--checkpoint DIR]

--checkpoint DIR writes the --model preset (random weights, seed 0, in --quant's dtype) to DIR
as an HF checkpoint once and benchmarks that, so each rank reads only its shard from disk (a
preset is otherwise built whole on every rank, then cut).

One process uses all the cores' threads; each of the N ranks gets threads/N. Configurations
alternate round by round (other jobs share the machine) and the table quotes medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

PLANS = [("1 process", 1, []), ("2 ranks, --tp 2", 2, ["--tp", "2"]),
         ("2 ranks, --ep 2", 2, ["--ep", "2"]),
         ("2 ranks, --tp 2 --ep 2", 2, ["--tp", "2", "--ep", "2"])]


def run(nproc: int, flags: list[str], a: argparse.Namespace, batch: int) -> dict:
    threads = max(1, (os.cpu_count() or 2) // nproc) if a.device == "cpu" else 1
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    bench = ["-m", "mixtral", "bench", "--model", a.model, "--quant", a.quant, "--device",
             a.device, "--batch", str(batch), "--prompt-len", str(a.prompt_len), "--gen-len",
             str(a.gen_len), "--repeats", "1", "--json", *flags]
    cmd = [sys.executable, *bench] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *bench]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def write_preset(name: str, quant: str, path: str) -> None:
    import torch

    from mixtral.checkpoint import save
    from mixtral.config import PRESETS
    from mixtral.model import Transformer

    with torch.device("meta"):
        model = Transformer(PRESETS[name]).to(torch.float32 if quant == "fp32" else torch.bfloat16)
    model = model.to_empty(device="cpu")
    model.init_weights(generator=torch.Generator().manual_seed(0))
    save({k: v.detach() for k, v in model.state_dict().items()}, model.args, path, "hf")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="bench")
    p.add_argument("--quant", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--checkpoint", help="write the preset here once and load it from disk")
    a = p.parse_args()
    if a.checkpoint:
        if not os.path.exists(a.checkpoint):
            write_preset(a.model, a.quant, a.checkpoint)
        a.model = a.checkpoint
    batches = [int(b) for b in a.batch.split(",")]
    results: dict[tuple[str, int], list[dict]] = {}
    for r in range(a.rounds):
        for batch in batches:
            for name, nproc, flags in PLANS:
                res = run(nproc, flags, a, batch)
                results.setdefault((name, batch), []).append(res)
                print(f"round {r} batch {batch} {name}: {res['decode_tok_s']} tok/s",
                      file=sys.stderr, flush=True)
    print(f"model {a.model}, {a.quant}, {a.device}, {os.cpu_count()} cores, prompt "
          f"{a.prompt_len}, {a.gen_len} new tokens, medians of {a.rounds} alternating rounds\n")
    print("| configuration | batch | decode tok/s | vs 1 process | prefill tok/s | "
          "peak RSS per rank (GiB) |\n|---|---|---|---|---|---|")
    for batch in batches:
        base = statistics.median(x["decode_tok_s"] for x in results[("1 process", batch)])
        for name, _, _ in PLANS:
            rows = results[(name, batch)]
            dec = statistics.median(x["decode_tok_s"] for x in rows)
            pre = statistics.median(x["prefill_tok_s"] for x in rows)
            rss = max(x["peak_rss_gib"] for x in rows)
            print(f"| {name} | {batch} | {dec:.2f} | {dec / base:.2f}x | {pre:.0f} | {rss:.2f} |")


if __name__ == "__main__":
    main()
