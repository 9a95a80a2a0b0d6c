#!/usr/bin/env python3
"""Summarize results.jsonl + roofline*.json into the anchors table (markdown on stdout).

Usage: python summarize.py [--results DIR] [--models DIR] [--quiet-max 0.3]
Defaults: results $BENCH_OUT (/tmp/bench-results), models $BENCH_MODELS (/tmp/bench-models).

Roofline: decode at batch 1 reads every active weight once per token, so
    tok/s <= BW / active_bytes_per_token
active bytes = all non-expert weights except the embedding table (one row is read), plus
top_k/n_experts of the expert weights.  For GGUF files the bytes are the real tensor sizes of
each quantization.  Batch 8: one step reads the non-expert weights once and each DISTINCT
expert chosen by the 8 tokens once; with uniform routing E[distinct] = E * (1 - (1 - k/E)^8)
(= 7.20 of 8 for top-2 of 8), so tok/s <= 8 * BW / step_bytes.
BW = the best 2-core memory rate measured by machine_roofline.py (max over runs of the numpy
copy (read+write) median, the 2-thread torch read rate and the fp32 GEMV weight stream).
"""
import argparse
import glob
import json
import os
import statistics
from collections import defaultdict
from collections.abc import Callable
from typing import Any


def gguf_bytes(path: str) -> tuple[int, int]:
    """(bytes every token reads: the dense tensors and one embedding row; the experts' bytes)."""
    from gguf import GGUFReader
    r = GGUFReader(path)
    dense = exp = 0
    for t in r.tensors:
        nb = int(t.n_bytes)
        if "_exps" in t.name:
            exp += nb
        elif t.name == "token_embd.weight":
            dense += nb // int(t.shape[-1])  # one row
        else:
            dense += nb
    return dense, exp


def hf_bytes(info: dict[str, Any], bytes_per: int) -> tuple[int, int]:
    c = info["config"]
    H, F, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    E = c["num_local_experts"]
    exp = L * E * 3 * H * F * bytes_per
    dense = (info["total_params"] - L * E * 3 * H * F - V * H + H) * bytes_per
    return dense, exp


def fmt(xs: list[float], nd: int = 1) -> str:
    if not xs:
        return "–"
    m = statistics.median(xs)
    if len(xs) == 1:
        return f"{m:.{nd}f}"
    return f"{m:.{nd}f} ({min(xs):.{nd}f}–{max(xs):.{nd}f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=os.environ.get("BENCH_OUT", "/tmp/bench-results"))
    ap.add_argument("--models", default=os.environ.get("BENCH_MODELS", "/tmp/bench-models"))
    ap.add_argument("--quiet-max", type=float, default=0.3,
                    help="a rep counts as 'quiet' when other processes kept < this many cores busy")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    info = json.load(open(os.path.join(a.models, "bench", "bench_info.json")))
    E = info["config"]["num_local_experts"]
    K = info["config"]["num_experts_per_tok"]
    distinct8 = E * (1 - (1 - K / E) ** 8)

    rf = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(a.results, "roofline*.json")))]
    rf = [r for r in rf if not r.get("smoke")]  # machine_roofline.py --smoke: tiny sizes
    cand: dict[str, tuple[float, float, float, int]] = {}
    for stat in ("bw_numpy_copy_GBps", "bw_torch_copy_GBps", "bw_torch_read_GBps",
                 "gemv16384_fp32_weight_GBps", "linear_b1_16384_fp32_weight_GBps"):
        vals = [r[stat]["median"] for r in rf if stat in r]
        if vals:
            cand[stat] = (statistics.median(vals), max(vals), min(vals), len(vals))
    bw = max(v[1] for v in cand.values())
    print("## Roofline inputs\n")
    print("| memory rate (2 cores unless noted) | median of runs | best run | worst run | runs |\n"
          "|---|---|---|---|---|")
    for k, v in cand.items():
        print(f"| {k} | {v[0]:.1f} GB/s | {v[1]:.1f} | {v[2]:.1f} | {v[3]} |")
    for stat in ("gemm4096_fp32_GFLOPs", "gemm4096_bf16_GFLOPs", "gemm1024_bf16_GFLOPs",
                 "gemv16384_fp32_GFLOPs", "gemv16384_bf16_GFLOPs",
                 "gemv_expert3584x1024_fp32_GFLOPs_incache",
                 "gemv_expert3584x1024_bf16_GFLOPs_incache"):
        vals = [r[stat]["median"] for r in rf if stat in r]
        if vals:
            print(f"| {stat} | {statistics.median(vals):.1f} GFLOP/s | {max(vals):.1f} "
                  f"| {min(vals):.1f} | {len(vals)} |")
    print(f"\nBW used for the roofline = {bw:.1f} GB/s (best of the above).\n")

    recs = [json.loads(line) for line in open(os.path.join(a.results, "results.jsonl"))]
    # (engine, dtype, threads) -> metric -> records; -> tag -> peak RSS
    groups: defaultdict[tuple[str, str, int], defaultdict[str, list[dict[str, Any]]]] = (
        defaultdict(lambda: defaultdict(list)))
    peaks: defaultdict[tuple[str, str, int], dict[str, float]] = defaultdict(dict)
    for r in recs:
        key = (r["engine"], r["dtype"], r.get("threads", 2))
        groups[key][r["metric"]].append(r)
        peaks[key][r.get("tag", "")] = max(peaks[key].get(r.get("tag", ""), 0), r["peak_rss_gib"])

    rows = []
    order = ["fp32", "bf16", "int8", "int4", "bench-f32", "bench-f16", "bench-q8_0", "bench-q4_0",
             "bench-q4_k_m"]
    engines = ["mixtral", "hf", "llama.cpp"]  # the engine names the bench_*.py records carry
    for key in sorted(groups, key=lambda k: (-k[2], engines.index(k[0]) if k[0] in engines else 9,
                                             order.index(k[1]) if k[1] in order else 99)):
        eng, dt, thr = key
        if eng == "mixtral":  # this project's engine records its own byte counts
            first = groups[key][next(iter(groups[key]))][0]
            dense, exp = first["dense_bytes"], first["expert_bytes"]
        elif eng == "hf":
            dense, exp = hf_bytes(info, {"fp32": 4, "bf16": 2}[dt])
        else:
            dense, exp = gguf_bytes(os.path.join(a.models, "gguf", dt + ".gguf"))
        b1_bytes = dense + exp * K / E
        b8_bytes = dense + exp * distinct8 / E
        g = groups[key]
        rows.append(dict(engine=eng, dtype=dt, threads=thr, g=g, peak=list(peaks[key].values()),
                         b1_bytes=b1_bytes, b8_bytes=b8_bytes, roof1=bw / b1_bytes * 1e9,
                         roof8=8 * bw / b8_bytes * 1e9,
                         detail=g[next(iter(g))][0]["engine_detail"]))

    def table(title: str, keep: Callable[[dict[str, Any]], bool]) -> None:
        print(f"## {title}\n")
        print("| engine | threads | dtype / quant | prefill 512 tok/s | decode tok/s b=1 "
              "| decode tok/s b=8 (total) | peak RSS GiB | active weight bytes/token (b=1) "
              "| roofline tok/s b=1 / b=8 | % of roofline b=1 | % of roofline b=8 |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            g = r["g"]
            sel = {m: [x["tok_s"] for x in g.get(m, []) if keep(x)]
                   for m in ("prefill", "decode_b1", "decode_b8")}
            cnt = {m: len(v) for m, v in sel.items()}
            p1 = fmt([100 * x / r["roof1"] for x in sel["decode_b1"]], 1)
            p8 = fmt([100 * x / r["roof8"] for x in sel["decode_b8"]], 1)
            name = {"hf": "HF transformers", "mixtral": "**mixtral (this project)**"}.get(
                r["engine"], "llama.cpp")
            print(f"| {name} | {r['threads']} | {r['dtype']} "
                  f"| {fmt(sel['prefill'])} [{cnt['prefill']}] "
                  f"| {fmt(sel['decode_b1'], 2)} [{cnt['decode_b1']}] "
                  f"| {fmt(sel['decode_b8'], 2)} [{cnt['decode_b8']}] | {fmt(r['peak'], 2)} "
                  f"| {r['b1_bytes'] / 1e6:.0f} MB | {r['roof1']:.1f} / {r['roof8']:.1f} "
                  f"| {p1} | {p8} |")
        print()

    table("All runs: median (min–max) [number of runs]", lambda x: True)
    table(f"Only runs during which other processes kept < {a.quiet_max} core busy",
          lambda x: x.get("other_cores", 9) < a.quiet_max)
    table(f"Only runs during which other processes kept >= {a.quiet_max} core busy (contended)",
          lambda x: x.get("other_cores", 9) >= a.quiet_max)
    print("Engine details: " + "; ".join(sorted({r["detail"] for r in rows})))
    print("\nTier each configuration's processes recorded (what they actually ran at):\n")
    for r in rows:
        seen = set()
        for ms in r["g"].values():
            for x in ms:
                isa = x.get("isa") or {}
                if r["engine"] == "mixtral":
                    t = (f"{x.get('tier')} (machine {isa.get('machine')}, "
                         f"MIXTRAL_ISA={isa.get('cap')}, PyTorch dispatch {isa.get('aten')}, "
                         f"ONEDNN_MAX_CPU_ISA={isa.get('onednn_max_cpu_isa')}; "
                         f"kernels: {(isa.get('paths') or {}).get('kernels')})")
                elif r["engine"] == "hf":
                    t = (f"PyTorch dispatch {isa.get('aten')}, "
                         f"ONEDNN_MAX_CPU_ISA={isa.get('onednn_max_cpu_isa')}")
                else:
                    t = (f"{x.get('tier')} build (built as {isa.get('build_tier')}, "
                         f"zmm check {isa.get('objdump_zmm_check') or 'n/a'})")
                seen.add(t if x.get("tier") or isa else "not recorded")
        print(f"- {r['engine']} {r['dtype']}: " + "; ".join(sorted(seen)))
    print("\nEvery run (other_cores = cores other processes kept busy during that measurement):\n")
    print("| engine | dtype | tag | metric | new tokens | tok/s | other_cores |\n"
          "|---|---|---|---|---|---|---|")
    for r in recs:
        print(f"| {r['engine']} | {r['dtype']} | {r.get('tag', '')} | {r['metric']} "
              f"| {r.get('new_tokens', r.get('tokens', ''))} "
              f"| {r['tok_s']:.2f} | {r.get('other_cores', float('nan')):.2f} |")
    if a.json:
        json.dump(dict(bw_GBps=bw, rows=[{k: v for k, v in r.items() if k != "g"} for r in rows],
                       roofline_inputs=cand), open(a.json, "w"), indent=1, default=str)


if __name__ == "__main__":
    main()
