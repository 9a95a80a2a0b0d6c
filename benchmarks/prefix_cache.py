"""Prefix reuse and n choices on the engine (issue 14, items 1 and 2), on the bench model.

    python benchmarks/prefix_cache.py [--model bench] [--quant bf16] [--turns 10]
        [--system 256] [--user 48] [--answer 32] [--prompt 512] [--gen 64] [--repeats 2]

  chat     a growing conversation of token ids: a system prompt of --system tokens, then per
           turn a user message of --user tokens and an answer of --answer (greedy, no early
           stop); turn k's prompt is everything before it. Time to first token of the last
           turn, cold (a fresh engine, prefix cache off: the whole prompt is prefilled) and
           cached (the same engine ran turns 1..k-1 with the prefix cache on, as a server does),
           and the TTFT of every cached turn.
  n        one prompt of --prompt tokens, --gen tokens sampled (temperature 0.8, seeds s+i, no
           early stop), as n=1 and as n=4 choices queued together, as the server queues them;
           wall time from queueing to the last token, each on a fresh engine (no prefix cache);
           and n=4 as before prompts were shared (`kv_copies=False`: four prefills).

Every measurement runs the engine loop on this thread (as `mixtral serve` does); medians over
--repeats (the cached chat runs once: repeating it would be a retry, not the same work), and
the process's CPU seconds beside the wall ones (`_cpu_s`): on a busy shared machine they
say more than the wall clock, best with --threads 1. The
model is a preset with random weights (`bench`: 8 layers, dim 1024, 8 experts; ~0.8B
parameters) unless --model names a checkpoint. Output: one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from mixtral.assemble import assemble
from mixtral.command import positive
from mixtral.engine import Engine, Job
from mixtral.generate import GenerationParams
from mixtral.model import Transformer


def ids(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def timed(engine: Engine, prompt: list[int], params: list[GenerationParams]
          ) -> tuple[float, float, list[list[int]], list[Job], float]:
    """Queue len(params) jobs of one prompt together, run them -> (seconds to the first token,
    seconds to the last, each job's tokens, the jobs, CPU seconds to the last)."""
    out: list[list[int]] = [[] for _ in params]
    stamps: list[float] = []

    def token(i: int, t: int) -> None:
        out[i].append(t)
        stamps.append(time.perf_counter())

    def on_token(i: int) -> Callable[[int], None]:  # job i's
        return lambda t: token(i, t)

    jobs = [engine.job(prompt, p, on_token(i), lambda e: None)
            for i, p in enumerate(params)]
    start, cpu = time.perf_counter(), time.process_time()
    engine.enqueue(jobs)
    engine.run(until_idle=True)
    return stamps[0] - start, stamps[-1] - start, out, jobs, time.process_time() - cpu


def engine(model: Transformer, context: int, prefix_cache: int, shared: bool = True
           ) -> Engine:
    return Engine(model, max_batch=4, max_seq_len=context, thread=False,
                  prefix_cache=prefix_cache, kv_copies=shared)


def chat(model: Transformer, a: argparse.Namespace) -> dict[str, object]:
    vocab, context = model.args.vocab_size, a.system + a.turns * (a.user + a.answer) + 8
    params = GenerationParams(max_tokens=a.answer, min_tokens=a.answer)
    cached = engine(model, context, 2**30)
    prompt, turns = [1] + ids(a.system - 1, 0, vocab), []
    for k in range(a.turns):
        prompt = prompt + ids(a.user, 100 + k, vocab)
        first, _, (answer,), (job,), _ = timed(cached, prompt, [params])
        turns.append({"prompt_tokens": len(prompt), "cached_tokens": job.cached_tokens,
                      "ttft_s": round(first, 3)})
        if k < a.turns - 1:
            prompt = prompt + answer
    first_cached = first
    cold = []
    for _ in range(a.repeats):
        first, _, (answer_cold,), _, _ = timed(engine(model, context, 0), prompt, [params])
        cold.append(first)
    # equal in exact arithmetic; in bf16 the reused KV (computed in other chunks, some one
    # token at a time) differs from the cold prefill's by what two chunk sizes differ by, which
    # on a random model's nearly flat logits can flip a greedy token: say so, do not hide it
    same = next((i for i, (x, y) in enumerate(zip(answer, answer_cold, strict=True)) if x != y),
                None)
    cold_s, cached_s = statistics.median(cold), first_cached
    return {"turn": a.turns, "prompt_tokens": len(prompt), "cold_ttft_s": round(cold_s, 3),
            "cached_ttft_s": round(cached_s, 3), "speedup": round(cold_s / cached_s, 1),
            "first_token_differing_from_cold": same, "turns": turns}


def choices(model: Transformer, a: argparse.Namespace) -> dict[str, object]:
    prompt = [1] + ids(a.prompt - 1, 7, model.args.vocab_size)
    runs = {"n1": (1, True), "n4": (4, True), "n4_unshared": (4, False)}
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(a.repeats):
        for key, (n, shared) in runs.items():  # interleaved: a busy neighbour hits all alike
            params = [GenerationParams(max_tokens=a.gen, min_tokens=a.gen, temperature=0.8,
                                       seed=10 * r + i) for i in range(n)]
            _, s, out, _, c = timed(engine(model, a.prompt + a.gen + 1, 0, shared), prompt,
                                    params)
            assert all(len(o) == a.gen for o in out)
            wall[key].append(s)
            cpu[key].append(c)
    result: dict[str, object] = {"prompt_tokens": a.prompt, "gen_tokens": a.gen}
    for key in runs:
        result[f"{key}_s"] = round(statistics.median(wall[key]), 3)
        result[f"{key}_cpu_s"] = round(statistics.median(cpu[key]), 3)
    for key in ("n4", "n4_unshared"):
        result[f"{key}_ratio"] = round(statistics.median(wall[key]) / statistics.median(
            wall["n1"]), 2)
        result[f"{key}_cpu_ratio"] = round(statistics.median(cpu[key]) / statistics.median(
            cpu["n1"]), 2)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="bench", help="a preset or a checkpoint (default bench)")
    p.add_argument("--quant", default="bf16", choices=["fp32", "bf16", "int8", "int4"])
    p.add_argument("--turns", type=positive, default=10)
    p.add_argument("--system", type=positive, default=256, help="system prompt tokens")
    p.add_argument("--user", type=positive, default=48, help="tokens per user message")
    p.add_argument("--answer", type=positive, default=32, help="tokens per answer")
    p.add_argument("--prompt", type=positive, default=512, help="the n test's prompt tokens")
    p.add_argument("--gen", type=positive, default=64, help="the n test's generated tokens")
    p.add_argument("--repeats", type=positive, default=2)
    p.add_argument("--only", choices=["chat", "n"], help="run one of the two")
    p.add_argument("--threads", type=positive, help="torch threads (default: torch's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    bits = int(a.quant[3:]) if a.quant in ("int8", "int4") else None
    model = assemble(a.model, dtype=torch.float32 if a.quant == "fp32" else torch.bfloat16,
                     quantize=bits, presets=True)
    timed(engine(model, 64, 0), [1] + ids(31, 1, model.args.vocab_size),  # warm-up
          [GenerationParams(max_tokens=4)] * 2)
    result: dict[str, object] = {"model": a.model, "quant": a.quant,
                                 "threads": torch.get_num_threads()}
    if a.only != "n":
        result["chat"] = chat(model, a)
    if a.only != "chat":
        result["n"] = choices(model, a)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
