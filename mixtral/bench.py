"""`mixtral bench`: prefill and decode speed of the engine, as external checks read them
(`python -m mixtral.bench --model tiny --json`; the command is at the end of this file).

Prefill is one forward pass over `prompt_len` tokens. Decode runs `batch` requests through the
engine (continuous batching, greedy, no early stop) and counts the tokens produced once every
request is decoding, so the figure is the steady batch-`batch` rate. Output keys are stable:
model, quant, device, threads, batch, prompt_len, gen_len, prefill_tok_s, decode_tok_s, ttft_s,
peak_rss_gib, weight_bytes_per_token, repeats; and, over the same steady decode tokens,
decode_disk_read_bytes_per_token (what reached the disk: /proc/self/io read_bytes; null where
unreadable), decode_expert_hit_rate and decode_prefetch_precision (null unless experts are
offloaded, resp. prefetched), and memory_limit: with --max-ram, the memory cgroup the run was
confined to (mixtral.cgroup: its limit counts the page cache, so a disk read is a disk read;
`honest` false, with the reason, where no cgroup could be made), else null; cache_policy and
prefetch: the offloaded experts' cache policy and read-ahead (null unless offloaded).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mixtral.assemble import offload_arguments
from mixtral.cache import KVCache
from mixtral.command import Arguments, positive, standalone
from mixtral.config import ModelArgs
from mixtral.engine import Engine
from mixtral.generate import GenerationParams
from mixtral.model import Transformer
from mixtral.prefill import prefill


def prompt_ids(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist()


@torch.inference_mode()
def prefill_once(model: Transformer, prompt: list[int]) -> float:
    """Seconds for one forward over the prompt into a fresh cache."""
    device = model.device
    cache = KVCache(model.args, 1, len(prompt) + 1, model.dtype, device)
    _sync(device)
    start = time.perf_counter()
    prefill(model, prompt, cache)  # in one chunk
    _sync(device)
    return time.perf_counter() - start


class Counters(NamedTuple):
    """What a decode step costs beyond time: bytes from the disk, expert-cache hits, misses."""

    read_bytes: int | None
    hits: int
    misses: int
    predicted: int = 0  # experts the next layer's router foresaw (mixtral.prefetch)
    foreseen: int = 0  # of them, those the next layer chose


class Decode(NamedTuple):
    rate: float  # decode tokens/s over all rows once all are decoding
    ttft: float  # seconds to the first token
    tokens: int  # tokens produced once all were decoding
    steady: Counters  # when all were decoding
    end: Counters  # at the last token


def disk_read_bytes(io: Path = Path("/proc/self/io")) -> int | None:
    """Bytes this process (all its threads) had read from storage; page-cache hits excluded."""
    try:
        for line in io.read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def counters(model: Transformer) -> Counters:
    cache = getattr(model, "expert_cache", None)  # offloaded experts (mixtral.offload)
    sight = cache.foresight if cache else None
    return Counters(disk_read_bytes(), cache.hits if cache else 0, cache.misses if cache else 0,
                    sight.predicted if sight else 0, sight.correct if sight else 0)


def decode_once(model: Transformer, batch: int, prompt_len: int, gen_len: int, seed: int,
                progress: Callable[[int], object] | None = None) -> Decode:
    """The decode figures of `Decode`; `progress(1)` after each token produced."""
    engine = Engine(model, max_queue=batch, max_batch=batch, thread=False,
                    max_seq_len=prompt_len + gen_len + 1, prefill_chunk=prompt_len)
    stamps: list[list[tuple[float, Counters]]] = [[] for _ in range(batch)]
    done = [threading.Event() for _ in range(batch)]
    params = GenerationParams(max_tokens=gen_len, min_tokens=gen_len)  # greedy, no early EOS
    try:
        start = time.perf_counter()
        for i in range(batch):
            engine.submit(prompt_ids(prompt_len, seed + i, model.args.vocab_size), params,
                          functools.partial(_stamp, stamps[i], model, progress),
                          functools.partial(_set, done[i]))
        engine.run(until_idle=True)  # on this thread, as `mixtral serve` runs it
        assert all(d.is_set() for d in done)
    finally:
        engine.stop()
    steady, at_steady = max(s[0] for s in stamps)  # from here every request is decoding
    produced = sum(sum(1 for t, _ in s if t > steady) for s in stamps)
    end, at_end = max(s[-1] for s in stamps)
    return Decode(produced / max(end - steady, 1e-9), stamps[0][0][0] - start, produced,
                  at_steady, at_end)


def run(model: Transformer, *, prompt_len: int = 512, gen_len: int = 128, batch: int = 1,
        repeats: int = 3, quant: str = "", model_name: str = "",
        progress: Callable[[int], object] | None = None) -> dict[str, Any]:
    """The figures of the module docstring; `progress(n)` as the measured runs prefill and
    decode tokens (repeats * (prompt_len + batch * gen_len) in all; the warm-up not counted)."""
    device = model.device
    prompt = prompt_ids(prompt_len, 1234, model.args.vocab_size)
    prefill_once(model, prompt[:16])  # warm-up
    decode_once(model, batch, 16, 4, 0)
    prefill, decode, ttft, runs = [], [], [], []
    cache = getattr(model, "expert_cache", None)  # offloaded experts (mixtral.offload)
    read_before = cache.store.bytes_read if cache else 0
    for r in range(repeats):
        prefill.append(prompt_len / prefill_once(model, prompt))
        if progress:
            progress(prompt_len)
        runs.append(decode_once(model, batch, prompt_len, gen_len, 4321 + 100 * r, progress))
        decode.append(runs[-1].rate)
        ttft.append(runs[-1].ttft)
    extra = {}
    if cache is not None:
        tokens = repeats * (prompt_len + batch * gen_len)
        extra["offload"] = {
            "budget_gib": round(cache.budget / 2**30, 2), "hits": cache.hits,
            "misses": cache.misses,
            "disk_read_gib_per_token": round((cache.store.bytes_read - read_before) / tokens
                                             / 2**30, 4)}
    return {
        "model": model_name, "quant": quant, "device": str(device),
        "threads": torch.get_num_threads(), "batch": batch, "prompt_len": prompt_len,
        "gen_len": gen_len, "prefill_tok_s": round(statistics.median(prefill), 2),
        "decode_tok_s": round(statistics.median(decode), 2),
        "ttft_s": round(statistics.median(ttft), 4), "peak_rss_gib": round(peak_rss_gib(), 3),
        "weight_bytes_per_token": weight_bytes_per_token(model.args, quant),
        "repeats": repeats, **decode_costs(runs, cache is not None), "memory_limit": None,
        "cache_policy": cache.policy.name if cache else None,
        "prefetch": cache.reader is not None if cache else None, **extra,
    }


def decode_costs(runs: list[Decode], offloaded: bool) -> dict[str, Any]:
    """The decode_* cost keys over the steady decode tokens of all runs."""
    tokens = sum(d.tokens for d in runs)
    reads = [(d.steady.read_bytes, d.end.read_bytes) for d in runs]
    read = None if any(a is None or b is None for a, b in reads) or not tokens else \
        round(sum(b - a for a, b in reads if a is not None and b is not None) / tokens)
    hits = sum(d.end.hits - d.steady.hits for d in runs)
    uses = hits + sum(d.end.misses - d.steady.misses for d in runs)
    predicted = sum(d.end.predicted - d.steady.predicted for d in runs)
    foreseen = sum(d.end.foreseen - d.steady.foreseen for d in runs)
    return {"decode_disk_read_bytes_per_token": read,
            "decode_expert_hit_rate": round(hits / uses, 4) if offloaded and uses else None,
            "decode_prefetch_precision": round(foreseen / predicted, 4) if predicted else None}


def weight_bytes_per_token(args: ModelArgs, quant: str) -> int:
    """Weights one batch-1 decode step reads: the active ones, one row of the embeddings."""
    a = args
    attention = a.dim * a.head_dim * (2 * a.n_heads + 2 * a.n_kv_heads)
    matmul = (a.n_layers * (attention + a.num_experts_per_tok * 3 * a.dim * a.hidden_dim)
              + a.vocab_size * a.dim)  # + the output head
    rest = a.n_layers * (a.num_experts * a.dim + 2 * a.dim) + 2 * a.dim  # routers, norms, 1 row
    per_weight = {"fp32": 4.0, "int8": 1.0, "int4": 0.5 + 4 / 128}.get(quant, 2.0)
    return int(matmul * per_weight + rest * (4 if quant == "fp32" else 2))


def _stamp(times: list[tuple[float, Counters]], model: Transformer,
           progress: Callable[[int], object] | None, _token: int) -> None:
    times.append((time.perf_counter(), counters(model)))
    if progress:
        progress(1)


def _set(event: threading.Event, _error: BaseException | None) -> None:
    event.set()


def peak_rss_gib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform != "darwin" else kib / 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- `mixtral bench` -----------------------------------------------------------------------------

def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="bench", help="a preset (bench, tiny, mixtral-8x7b: "
                   "random weights) or a checkpoint path (default: bench)")
    p.add_argument("--quant", default="bf16", choices=["fp32", "bf16", "int8", "int4"],
                   help="the weights' format (a quantized checkpoint keeps its own)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--prompt-len", type=positive, default=512, help="prompt tokens (prefill)")
    p.add_argument("--gen-len", type=positive, default=128, help="tokens generated (decode)")
    p.add_argument("--batch", type=positive, default=1, help="sequences decoded together")
    p.add_argument("--repeats", type=positive, default=3, help="medians over this many runs")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel (under torchrun)")
    p.add_argument("--ep", type=int, default=1, help="expert parallel (under torchrun)")
    p.add_argument("--json", action="store_true", help="one JSON line (stable keys)")
    p.add_argument("--reference", action="store_true",
                   help="measure the reference modules of model.py, without the fast paths")
    p.add_argument("--max-ram", help="offload experts under this RAM budget (quantized "
                   "checkpoint path), run inside a memory cgroup of the budget + 512 MiB "
                   "where the machine allows (root; see memory_limit in --json)")
    offload_arguments(p)
    p.set_defaults(run=main)


COMMANDS: dict[str, Arguments] = {"bench": arguments}


def main(args: argparse.Namespace) -> int:
    """One benchmark, printed as a table or (--json) one line; under --tp/--ep every rank runs
    it on its shard and rank 0 prints."""
    from mixtral.assemble import assemble, is_preset
    from mixtral.cgroup import confine
    from mixtral.offload import drop_page_cache
    from mixtral.parallel import is_leader
    from mixtral.progress import bar
    from mixtral.sizes import parse_size

    float_dtype = torch.float32 if args.quant == "fp32" else torch.bfloat16
    plan = None
    if args.tp > 1 or args.ep > 1:
        from mixtral import parallel

        if args.quant in ("int8", "int4") or args.max_ram:
            raise parallel.ParallelError("--tp/--ep benchmark float weights (fp32, bf16): "
                                         "drop --quant int8/int4 and --max-ram")
        plan, args.device = parallel.join(args.tp, args.ep, args.device)
    bits = int(args.quant[3:]) if args.quant in ("int8", "int4") else None
    offloaded = args.max_ram and not is_preset(args.model)  # experts keep the file's dtype
    with contextlib.ExitStack() as stack:
        limit = None
        if offloaded:  # the budget made real: the page cache counts (mixtral.cgroup)
            limit = stack.enter_context(confine(parse_size(args.max_ram, "--max-ram")))
            if not limit.honest:
                print(f"mixtral bench: not confined to --max-ram, so its disk figures are not "
                      f"honest (the page cache may serve misses from RAM): {limit.reason}",
                      file=sys.stderr)
            drop_page_cache(args.model)
        model = assemble(args.model, dtype=None if offloaded else float_dtype,
                         device=args.device, max_ram=args.max_ram, quantize=bits, plan=plan,
                         cache_policy=args.cache_policy, prefetch=args.prefetch,
                         fast=not args.reference, presets=True)
        # on a terminal's stderr, never beside --json (whose line a script reads), rank 0 alone
        with bar(args.repeats * (args.prompt_len + args.batch * args.gen_len), "bench", "tok",
                 shown=False if args.json or not is_leader() else None) as tokens:
            result = run(model, prompt_len=args.prompt_len, gen_len=args.gen_len,
                         batch=args.batch, repeats=args.repeats, quant=args.quant,
                         model_name=args.model, progress=tokens.update)
        if limit is not None:
            result["memory_limit"] = limit.report()
    if plan is not None:
        if not is_leader():  # every rank measured its shard; rank 0 reports
            return 0
        result["parallel"] = {"tp": plan.tp, "ep": plan.ep, "world": plan.world}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(standalone("python -m mixtral.bench", COMMANDS))
