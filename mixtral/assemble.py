"""Assembling a runnable model: the one place where "a model" (the built-in default, a preset
or a checkpoint path) becomes the model a command runs. The commands, the lm-eval adapter,
`mixtral.load`, the scripts and the benchmarks all call `assemble`, so its steps and their
order are written once:

  source     None: the built-in default (mixtral.default_model); a preset name, where asked
             for (`presets=True`): its seeded random weights; else a checkpoint path
  load       into memory, or with `max_ram` (a quantized checkpoint) its experts left on disk
             and paged in under that budget (mixtral.offload)
  quantize   a float model to int8/int4 in place (benchmarks); a quantized file stays as is
  LoRA       an adapter folder merged into the weights (mixtral.lora)
  shard      under a parallel plan, this rank's part only (mixtral.parallel); from a
             checkpoint only that part is read
  fast       the fast paths (mixtral.fast), unless `fast=False`: the reference modules

`add_arguments` and `from_args` are its command-line face: the --model ... --ep flags that
every command running a model shares, turned into one `assemble` call.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and the model load lazily: `mixtral info` starts without them
    import torch

    from mixtral.checkpoint.files import Progress
    from mixtral.config import ModelArgs
    from mixtral.model import Transformer
    from mixtral.parallel import Plan


def assemble(source: str | os.PathLike | None = None, *,
             dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
             max_ram: str | int | None = None, kv_cache_bytes: int = 0,
             cache_policy: str | None = None, prefetch: bool | None = None,
             quantize: int | None = None, group_size: int | None = None,
             lora: str | os.PathLike | None = None, plan: Plan | None = None,
             fast: bool = True, presets: bool = False,
             announce: Callable[[str], None] | None = None,
             progress: Progress | None = None) -> Transformer:
    """The model `source` names, loaded, transformed and ready to run, in eval mode.

    dtype: the weights' (default: the checkpoint's). max_ram: see mixtral.load; the budget must
    hold the caller's KV cache too (`kv_cache_bytes`); cache_policy and prefetch: the offloaded
    experts' (mixtral.offload.load_offloaded). quantize: 8 or 4 bits (int4 groups of
    `group_size`). plan: this rank's share under --tp/--ep (a launch joined with
    parallel.join). announce: told the default model's label when the default is used, and
    how a GGUF file's tensor types were mapped. progress: told the bytes read as a checkpoint
    loads whole (checkpoint.load)."""
    from mixtral.configs import parse_dtype

    dtype = parse_dtype(dtype)
    model = _source(source, dtype, device, max_ram, kv_cache_bytes, plan, presets, announce,
                    progress, cache_policy, prefetch)
    if quantize is not None:
        import torch

        from mixtral.quant import quantize_model

        if isinstance(model.output, torch.nn.Linear):  # not a checkpoint quantized already
            quantize_model(model, quantize, group_size)
    if lora is not None:
        from mixtral.lora import load_adapter, merge_lora

        merge_lora(load_adapter(model, Path(lora)))
    if fast:
        from mixtral.fast import optimize

        optimize(model)
    return model.eval()


def _source(source: str | os.PathLike | None, dtype: torch.dtype | None,
            device: torch.device | str, max_ram: str | int | None, kv_cache_bytes: int,
            plan: Plan | None, presets: bool, announce: Callable[[str], None] | None,
            progress: Progress | None = None, cache_policy: str | None = None,
            prefetch: bool | None = None) -> Transformer:
    """The model as read or built, whole or (under a plan) this rank's part of it."""
    if source is None:  # max_ram does not apply: the default is small and in memory
        from mixtral.default_model import label, load_default

        if announce is not None:
            announce(label())
        model = load_default(dtype, device)
    elif presets and is_preset(source):
        model = random_preset(str(source), dtype, device)
    elif plan is not None:
        from mixtral.parallel import load_sharded

        return load_sharded(source, plan, dtype, device)
    elif max_ram is not None:
        from mixtral.offload import DEFAULT_POLICY, load_offloaded

        return load_offloaded(source, max_ram, dtype, kv_cache_bytes,
                              cache_policy or DEFAULT_POLICY, prefetch)
    else:
        from mixtral.checkpoint import load

        return load(source, dtype, device, announce, progress)
    if plan is None:
        return model
    from mixtral.parallel import shard_modules

    return shard_modules(model, plan)  # built whole (the default, a preset), then cut


def preflight(source: str | os.PathLike) -> str:
    """The model's name, once its source is known to be readable (headers, config and
    vocabulary checked; no weights read): `serve` calls it before it opens its port, so a bad
    --model is one line, not a server that answers 503 until it dies."""
    from mixtral.checkpoint import inspect
    from mixtral.checkpoint.files import is_gguf
    from mixtral.hub import is_repo_id, resolve

    path = resolve(source)
    if is_gguf(path):
        from mixtral.checkpoint.gguf import open_gguf

        open_gguf(path)
        return path.stem
    inspect(path)
    if not Path(source).exists() and is_repo_id(str(source)):
        return str(source).split("/")[1]  # the repo's name, not its snapshot's commit
    return (path if path.is_dir() else path.parent).resolve().name


def is_preset(source: str | os.PathLike) -> bool:
    from mixtral.config import PRESETS

    return str(source) in PRESETS and not Path(source).exists()  # a folder of that name wins


def random_preset(name: str, dtype: torch.dtype | None = None,
                  device: torch.device | str = "cpu") -> Transformer:
    """A preset's shape with seeded random weights, made directly on `device` (benchmarks of
    a model too big to build twice: mixtral-8x7b)."""
    import torch

    from mixtral.config import PRESETS
    from mixtral.model import Transformer

    with torch.device("meta"):
        model = Transformer(PRESETS[name]).to(dtype)
    model = model.to_empty(device=device)
    model.init_weights(generator=torch.Generator(device).manual_seed(0))
    return model


# --- the command line's face ---------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of every command that runs a model (chat, generate, serve, eval)."""
    p.add_argument("--model", metavar="PATH", help="checkpoint folder or file (HF or "
                   "Mistral layout, or GGUF), or a Hugging Face repo id ORG/NAME (from its "
                   "cache, else downloaded; ORG/NAME:Q4_K_M: one GGUF file of it); default: "
                   "the built-in default model")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--reference", action="store_true", help="run the reference modules of "
                   "model.py instead of the fast paths (mixtral.fast)")
    p.add_argument("--max-ram", help="keep experts on disk, paged in under this RAM budget "
                   "(e.g. 16GiB; a quantized checkpoint on the CPU)")
    offload_arguments(p)
    p.add_argument("--lora", metavar="ADAPTER", help="a LoRA adapter folder (from "
                   "mixtral train ... lora_rank=N), merged into the weights at load")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel over N processes "
                   "(launch with torchrun --nproc-per-node N -m mixtral ...)")
    p.add_argument("--ep", type=int, default=1, help="expert parallel over N processes "
                   "(combinable with --tp over the same N)")


def offload_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that tune --max-ram's experts cache (here and in `mixtral bench`)."""
    from mixtral.cache_policy import POLICIES

    p.add_argument("--cache-policy", choices=POLICIES, help="which expert --max-ram's "
                   "cache evicts (default cycle: uses that fade with age, less how soon the "
                   "expert's layer comes round)")
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction,
                   help="with --max-ram, read the experts the routers foresee in a background "
                   "thread while others compute (default off: on this project's VM the reads "
                   "slowed while computing and gained nothing; try it where the disk is local)")


def from_args(args: argparse.Namespace,
              kv_positions: Callable[[ModelArgs], int] | None = None) -> Transformer:
    """The model `add_arguments`' flags describe. Under --tp/--ep this joins the torchrun
    launch first (then only rank 0 speaks: parallel.is_leader). kv_positions: the KV cache
    positions the command will allocate for this model, which a --max-ram budget must leave
    room for (default: one sequence of up to 4096 prompt tokens plus the answer)."""
    from mixtral import parallel
    from mixtral.configs import parse_dtype

    dtype = parse_dtype(args.dtype)  # a bad --dtype fails first, before any launch or read
    for flag, given in (("--cache-policy", args.cache_policy), ("--[no-]prefetch", args.prefetch)):
        if given is not None and not args.max_ram:
            raise ValueError(f"{flag} tunes the experts cache of --max-ram; add --max-ram")
    plan, device = None, args.device
    if args.tp > 1 or args.ep > 1:
        for flag, given in (("--max-ram", args.max_ram), ("--lora", args.lora)):
            if given:
                raise parallel.ParallelError(f"{flag} does not combine with --tp/--ep (merge "
                                             "an adapter first: mixtral lora merge)")
        plan, device = parallel.join(args.tp, args.ep, args.device)
    kv_bytes = 0
    if args.max_ram and args.model is not None:
        from mixtral.checkpoint import inspect
        from mixtral.config import kv_cache_bytes_per_token

        margs = inspect(args.model).args
        positions = kv_positions or (lambda m: min(m.max_seq_len,
                                                   4096 + getattr(args, "max_tokens", 0)))
        kv_bytes = kv_cache_bytes_per_token(margs) * positions(margs)
    quiet = not parallel.is_leader()
    from mixtral.progress import Stages

    with Stages(Path(args.model or "default").name, shown=False if quiet else None) as bar:
        def loading(stage: str, done: int, total: int) -> None:
            if total >= LOAD_BAR_BYTES:
                bar(stage, done, total)

        return assemble(args.model, dtype=dtype, device=device, max_ram=args.max_ram,
                        kv_cache_bytes=kv_bytes, cache_policy=args.cache_policy,
                        prefetch=args.prefetch, lora=args.lora, plan=plan,
                        fast=not args.reference, announce=None if quiet else _announce,
                        progress=loading)


LOAD_BAR_BYTES = 300_000_000  # a smaller load takes a second or two: no bar


def _announce(label: str) -> None:
    print(f"[mixtral] {label}", file=sys.stderr)
