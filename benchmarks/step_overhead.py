"""What one batch-1 decode step costs beyond streaming the weights (issue 12): the torch ops it
dispatches and the Python calls it makes, counted (counts do not depend on how busy the machine
is), and, with --time on a quiet machine, its wall time split into the weight kernels' time and
the rest (Python, small ops, allocations).

    python benchmarks/step_overhead.py                         # the bench preset, int4
    python benchmarks/step_overhead.py --model tiny --quant int8
    MIXTRAL_ISA=avx2 python benchmarks/step_overhead.py --time --json

The step is the engine's (mixtral/engine.py `_decode_forward`): the token and position tensors
built from Python ints, the cache's view of row 0, the model's forward, then a greedy choice
read back as an int. It runs after a --context-token prompt, on random weights quantized at
load (the ops do not depend on the weights' values).

Counted three ways, for one step after a warm-up step:
  dispatched  ops the Python code calls (a TorchDispatchMode: aten ops, views included, and our
              kernels' ops), by the file of the Python line that called them
  all ops     every op the profiler records, ops that run inside other ops included
  python      function calls (cProfile), by file: ours, torch's, builtins
--time: the median of --steps steps' wall time, without any instrument, and the self time of
the weight-streaming kernels (KERNELS below) under the profiler over the same number of steps;
the rest is the difference. On a busy machine these figures mean little.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from mixtral import cpu, kernels
from mixtral.assemble import assemble
from mixtral.cache import KVCache
from mixtral.model import Transformer
from mixtral.prefill import prefill

ROOT = Path(__file__).resolve().parents[1]
TORCH = Path(torch.__file__).resolve().parent
# the ops whose self time is the streaming of weights (ours, PyTorch's low-bit and oneDNN ones)
KERNELS = ("mixtral_", "aten::_weight_int", "mkldnn::_linear_pointwise", "aten::mm",
           "aten::addmm", "aten::bmm")


def where(filename: str) -> str:
    """A source file as the tables name it: mixtral/fast.py, torch/nn/..., or '~' (builtins)."""
    if filename == "~" or filename.startswith("<"):
        return "~ (builtins)"
    path = Path(filename).resolve()
    for base, prefix in ((TORCH, "torch/"), (ROOT, "")):  # torch may sit inside ROOT's venv
        if path.is_relative_to(base):
            rel = str(path.relative_to(base))
            return prefix + ("/".join(rel.split("/")[:2]) if prefix else rel)
    return path.name


class Counter(TorchDispatchMode):
    """Counts each op dispatched from Python, by op name and by the calling function (the
    first frame outside torch)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.callers: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        self.ops[str(func.overloadpacket)] += 1
        frame = sys._getframe(1)
        while frame is not None and Path(frame.f_code.co_filename).resolve().is_relative_to(TORCH):
            frame = frame.f_back  # type: ignore[assignment]
        code = frame.f_code if frame else None
        self.callers[f"{where(code.co_filename)} {code.co_name}" if code else "?"] += 1
        return func(*args, **(kwargs or {}))


class Stepper:
    """One decode step of the engine on row 0 of a cache, the position advancing each call."""

    def __init__(self, model: Transformer, context: int, steps: int) -> None:
        self.model = model
        g = torch.Generator().manual_seed(0)
        prompt = [1] + torch.randint(3, model.args.vocab_size, (context - 1,), generator=g).tolist()
        self.cache = KVCache(model.args, 1, context + steps + 8, model.dtype, model.device)
        self.token = int(prefill(model, prompt, self.cache).argmax())
        self.position = context

    @torch.inference_mode()
    def __call__(self) -> None:
        device = self.model.device
        tokens = torch.tensor([[self.token]], device=device)  # as engine._decode_forward
        positions = torch.tensor([[self.position]], device=device)
        logits = self.model(tokens, positions, self.cache.rows([0]))
        self.token = int(logits[0, -1].argmax())  # greedy sampling's argmax and read-back
        self.position += 1


def count(step: Callable[[], None]) -> dict[str, Any]:
    with Counter() as counter:
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    all_ops = collections.Counter(e.name for e in prof.events())
    profiler = cProfile.Profile()
    profiler.enable()
    step()
    profiler.disable()
    calls: collections.Counter[str] = collections.Counter()
    for (filename, _line, _name), (_cc, nc, *_rest) in \
            pstats.Stats(profiler).stats.items():  # type: ignore[attr-defined]
        calls[where(filename)] += nc
    return {"dispatched": sum(counter.ops.values()),
            "dispatched_by_file": dict(counter.callers.most_common()),
            "dispatched_by_op": dict(counter.ops.most_common()),
            "all_ops": sum(all_ops.values()), "all_ops_by_op": dict(all_ops.most_common()),
            "python_calls": sum(calls.values()), "python_calls_by_file": dict(calls.most_common())}


def timing(step: Callable[[], None], steps: int) -> dict[str, float]:
    walls = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        walls.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    kernel_us = sum(e.self_cpu_time_total for e in prof.key_averages()
                    if e.key.startswith(KERNELS)) / steps
    wall_us = statistics.median(walls) * 1e6
    return {"step_ms": round(wall_us / 1e3, 3), "kernels_ms": round(kernel_us / 1e3, 3),
            "rest_ms": round((wall_us - kernel_us) / 1e3, 3),
            "rest_share": round(1 - kernel_us / wall_us, 3)}


def table(title: str, counts: dict[str, int], top: int) -> None:
    print(f"  {title}")
    for name, n in list(counts.items())[:top]:
        print(f"    {n:>7}  {name}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bench", help="a preset (random weights) or a checkpoint")
    p.add_argument("--quant", default="int4", choices=["fp32", "bf16", "int8", "int4"])
    p.add_argument("--context", type=int, default=512, help="prompt tokens before the step")
    p.add_argument("--time", action="store_true", help="also the wall time split (quiet machine)")
    p.add_argument("--steps", type=int, default=64, help="steps timed with --time")
    p.add_argument("--reference", action="store_true", help="model.py's modules, no fast paths")
    p.add_argument("--json", action="store_true", help="one JSON line")
    p.add_argument("--top", type=int, default=12, help="rows per table")
    args = p.parse_args()
    bits = int(args.quant[3:]) if args.quant in ("int8", "int4") else None
    dtype = torch.float32 if args.quant == "fp32" else torch.bfloat16
    model = assemble(args.model, dtype=dtype, quantize=bits, fast=not args.reference,
                     presets=True)
    step = Stepper(model, args.context, 2 * args.steps + 8)
    step()  # warm-up: first-call packing, caches
    result: dict[str, Any] = {"model": args.model, "quant": args.quant,
                              "tier": cpu.probe().tier, "activations": cpu.probe().activations,
                              "kernels": kernels.available(), "context": args.context,
                              **count(step)}
    if args.time:
        result.update(timing(step, args.steps))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.model} {args.quant}, tier {result['tier']} ({result['activations']} "
          f"activations, our kernels {'on' if result['kernels'] else 'off'}), one decode "
          f"step after {args.context} tokens")
    print(f"  ops dispatched from Python {result['dispatched']}, all ops "
          f"{result['all_ops']}, Python calls {result['python_calls']}")
    table("dispatched, by calling function", result["dispatched_by_file"], args.top)
    table("dispatched, by op", result["dispatched_by_op"], args.top)
    table("all ops, by op", result["all_ops_by_op"], args.top)
    table("Python calls, by file", result["python_calls_by_file"], args.top)
    if args.time:
        print(f"  step {result['step_ms']} ms: weight kernels {result['kernels_ms']} ms, the "
              f"rest {result['rest_ms']} ms ({100 * result['rest_share']:.0f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
