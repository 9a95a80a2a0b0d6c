#!/usr/bin/env python3
"""This project's engine on the anchors' bench model, measured like bench_hf.py and
bench_llamacpp.py (same prompt ids, same JSON lines), so summarize.py puts it in the same table.

  prefill : one forward over P tokens into the KV cache, logits for the last only
  b1      : one 128-token request through the engine, greedy, N tokens, no early stop;
            tok/s = (N-1) / (time of the N-th token - time of the 1st)
  b8      : 8 requests at once through the continuous-batching engine; tok/s = tokens produced
            once all 8 are decoding / that time (the steady batch-8 rate)

The engine runs on this (the main) thread, as `mixtral serve` runs it.
Usage: python bench_mixtral.py [--model DIR] [--quant fp32|bf16|int8|int4] [--what ...]
                               [--reps 1] [--threads 2] [--out FILE.jsonl] [--tag NAME]
"""
import argparse
import json
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# mixtral first: importing it carries MIXTRAL_ISA over to PyTorch and oneDNN (cpu.cap_torch),
# which only takes full effect before torch starts
import mixtral  # noqa: E402, F401

# isort: split
import torch  # noqa: E402

from mixtral import cpu  # noqa: E402
from mixtral.assemble import assemble  # noqa: E402
from mixtral.bench import peak_rss_gib, weight_bytes_per_token  # noqa: E402
from mixtral.cache import KVCache  # noqa: E402
from mixtral.engine import Engine  # noqa: E402
from mixtral.fast import describe_paths  # noqa: E402
from mixtral.generate import GenerationParams  # noqa: E402


def stamper(stamps: list[float]) -> Callable[[int], None]:
    """An engine job's on_token that notes in `stamps` when each token came."""
    return lambda _t: stamps.append(time.perf_counter())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(os.environ.get("BENCH_MODELS",
                                                                   "/tmp/bench-models"), "bench"),
                    help="a checkpoint, or a preset (random weights: tiny for a smoke run)")
    ap.add_argument("--quant", default="bf16", choices=["fp32", "bf16", "int8", "int4"])
    ap.add_argument("--what", default="prefill,b1,b8")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", 2)))
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(os.environ.get("BENCH_OUT",
                                                                 "/tmp/bench-results"),
                                                  "results.jsonl"))
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model = assemble(a.model, dtype="fp32" if a.quant == "fp32" else "bf16",
                     quantize=int(a.quant[3:]) if a.quant in ("int8", "int4") else None,
                     presets=True)
    load_s = time.perf_counter() - t0
    args = model.args
    per_token = weight_bytes_per_token(args, a.quant)
    bytes_per = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5 + 4 / 128}[a.quant]
    expert_bytes = args.n_layers * args.num_experts * 3 * args.dim * args.hidden_dim * bytes_per
    dense_bytes = per_token - expert_bytes * args.num_experts_per_tok / args.num_experts
    c = cpu.probe()
    # the tier this process actually ran at: cpu.probe() (the machine's, capped by MIXTRAL_ISA),
    # PyTorch's own dispatch, oneDNN's cap and the path each kind of weight took
    isa = dict(tier=c.tier, machine=c.machine, cap=c.cap, aten=c.aten,
               onednn_max_cpu_isa=os.environ.get("ONEDNN_MAX_CPU_ISA"), paths=describe_paths())
    base = dict(engine="mixtral", engine_detail="mixtral (packed oneDNN weights, direct MoE "
                "decode, continuous batching)", dtype=a.quant, threads=a.threads, tag=a.tag,
                torch=torch.__version__, dense_bytes=dense_bytes, expert_bytes=expert_bytes,
                tier=c.tier, isa=isa)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)

    def emit(rec: dict) -> None:
        rec = {**base, **rec, "load_s": load_s, "peak_rss_gib": peak_rss_gib(),
               "time": time.time()}
        with open(a.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)

    def decode(batch: int, n_new: int, seed: int) -> dict:
        ids = common.prompt_ids(batch, a.prompt_len, seed).tolist()
        engine = Engine(model, max_queue=batch, max_batch=batch, thread=False,
                        max_seq_len=a.prompt_len + n_new + 1, prefill_chunk=a.prompt_len)
        stamps: list[list[float]] = [[] for _ in range(batch)]
        params = GenerationParams(max_tokens=n_new, min_tokens=n_new)
        with common.CpuMeter() as cm:
            for i in range(batch):
                engine.submit(ids[i], params, stamper(stamps[i]), lambda _e: None)
            engine.run(until_idle=True)
        engine.stop()
        assert all(len(s) == n_new for s in stamps)
        steady = max(s[0] for s in stamps)
        produced = sum(sum(1 for t in s if t > steady) for s in stamps)
        return dict(decode_tok_s=produced / (max(s[-1] for s in stamps) - steady),
                    new_tokens=n_new, other_cores=cm.other_cores, my_cores=cm.my_cores)

    whats = a.what.split(",")
    with torch.inference_mode():
        if "prefill" in whats:
            ids = torch.from_numpy(common.prompt_ids(1, a.prefill_len, 1234))
            cache = KVCache(args, 1, a.prefill_len, model.dtype)
            w = min(64, a.prefill_len)  # warm-up; a --prefill-len under 64 overflowed the cache
            model(ids[:, :w], torch.arange(w)[None], cache, last_only=True)
            for r in range(a.reps):
                cache = KVCache(args, 1, a.prefill_len, model.dtype)
                with common.CpuMeter() as cm:
                    t = time.perf_counter()
                    model(ids, torch.arange(a.prefill_len)[None], cache, last_only=True)
                    dt_s = time.perf_counter() - t
                emit(dict(metric="prefill", tokens=a.prefill_len, seconds=dt_s,
                          tok_s=a.prefill_len / dt_s, rep=r, other_cores=cm.other_cores,
                          my_cores=cm.my_cores))
    if "b1" in whats:
        decode(1, 8, 7)  # warm-up
        for r in range(a.reps):
            res = decode(1, a.new_tokens, 4321 + r)
            emit(dict(metric="decode_b1", batch=1, prompt_len=a.prompt_len,
                      tok_s=res["decode_tok_s"], rep=r, **res))
    if "b8" in whats:
        decode(a.batch, 8, 7)
        for r in range(a.reps):
            res = decode(a.batch, a.new_tokens, 8765 + r)
            emit(dict(metric=f"decode_b{a.batch}", batch=a.batch, prompt_len=a.prompt_len,
                      tok_s=res["decode_tok_s"], rep=r, **res))


if __name__ == "__main__":
    main()
