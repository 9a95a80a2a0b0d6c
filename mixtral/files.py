"""The file tools: `mixtral info` (sizes of a preset or checkpoint, a checkpoint's layout, and
with --system this CPU's paths), `convert` (HF <-> Mistral layout), `quantize` (an int8/int4
copy that mixtral.load reads) and `lora merge` (an adapter folded into its base).

    python -m mixtral.files info mixtral-8x7b
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mixtral.command import Arguments, standalone
from mixtral.sizes import parse_size


def info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", help="a preset name (mixtral-8x7b, bench, tiny) or a path")
    p.add_argument("--system", action="store_true",
                   help="the CPU tier (MIXTRAL_ISA caps it) and the paths chosen for it")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(run=run_info)


def convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a checkpoint folder or weights file, in any layout we read")
    p.add_argument("dst", help="an empty or new folder")
    p.add_argument("--to", required=True, choices=["hf", "mistral"],
                   help="the layout to write (README: Checkpoints)")
    p.add_argument("--dtype", help="cast to bf16, fp16 or fp32 (default: keep)")
    p.add_argument("--shard-size", default="5GB",
                   help="largest HF shard, e.g. 5GB (5 x 10^9 bytes), 500MB, 2GiB (2 x 2^30)")
    p.set_defaults(run=run_convert)


def quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a float checkpoint folder or weights file")
    p.add_argument("dst", help="an empty or new folder")
    p.add_argument("--bits", type=int, required=True, choices=[8, 4],
                   help="int8 (one scale per row) or int4 (a scale and zero per group)")
    p.add_argument("--group-size", type=int, help="int4 group size: 32, 64, 128 or 256 "
                   "(default: the largest of 128/64/32 that divides every input size)")
    p.add_argument("--shard-size", default="5GB",
                   help="largest shard, e.g. 5GB (5 x 10^9 bytes), 500MB, 2GiB (2 x 2^30)")
    p.add_argument("--layout", default="portable", choices=["portable", "cpu64"],
                   help="portable (the only one written: the same bytes on every machine; "
                   "cpu64 files of mixtral 0.1 still load)")
    p.set_defaults(run=run_quantize)


def lora_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["merge"],
                   help="merge: fold the adapter into the base's float weights")
    p.add_argument("base", help="the base checkpoint")
    p.add_argument("adapter", help="the adapter folder (adapter.safetensors + config)")
    p.add_argument("dst", help="where to write the merged checkpoint (HF layout)")
    p.set_defaults(run=run_lora)


COMMANDS: dict[str, Arguments] = {"info": info_arguments, "convert": convert_arguments,
                                  "quantize": quantize_arguments, "lora": lora_arguments}


def run_info(args: argparse.Namespace) -> int:
    from mixtral.config import PRESETS, kv_cache_bytes_per_token, param_counts, weight_bytes

    if args.system:
        from mixtral.fast import describe_paths

        system = describe_paths()
        print(json.dumps(system, indent=2) if args.json else
              "\n".join(f"{k:<13} {v}" for k, v in system.items()))
        if args.target is None:
            return 0
    if args.target is None:
        raise ValueError("name a preset (mixtral-8x7b, bench, tiny) or a checkpoint path, or "
                         "pass --system")
    report: dict[str, Any] = {"target": args.target}
    preset = args.target in PRESETS and not Path(args.target).exists()
    gguf_file = None if preset else _gguf(args.target)
    if preset:
        margs = PRESETS[args.target]
        report["source"] = "preset"
    elif gguf_file is not None:
        from mixtral.checkpoint.gguf import describe, open_gguf

        gguf = open_gguf(gguf_file)
        margs = gguf.args
        report["source"] = "gguf"
        report["gguf"] = describe(gguf)
    else:
        from mixtral.checkpoint import inspect
        from mixtral.configs import dtype_name

        ckpt = inspect(args.target)
        margs = ckpt.args
        report["source"] = "checkpoint"
        report["checkpoint"] = {
            "layout": ckpt.layout.name, "layout_description": ckpt.layout.description,
            "dtype": dtype_name(ckpt.dtype), "config": str(ckpt.config_file),
            "files": [str(f) for f in ckpt.weight_files], "tensors": len(ckpt.entries),
            "bytes": ckpt.nbytes, "quantization": ckpt.quantization}
    counts = param_counts(margs)
    kv = kv_cache_bytes_per_token(margs)
    report.update({
        "args": margs.to_dict(),
        "params": {"total": counts["total"], "active": counts["active"]},
        "weight_bytes": {"bf16": weight_bytes(margs, 16), "int8": weight_bytes(margs, 8),
                         "int4": weight_bytes(margs, 4)},
        "kv_cache_bytes": {"per_token_bf16": kv, "full_context_bf16": kv * margs.max_seq_len},
    })
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    a = margs
    print(f"{args.target} ({report['source']})")
    print(f"  architecture  dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads / {a.n_kv_heads} "
          f"kv heads x {a.head_dim}, {a.num_experts} experts (top-{a.num_experts_per_tok}) of "
          f"hidden {a.hidden_dim}, vocab {a.vocab_size}")
    print(f"                rope_theta {a.rope_theta:g}, norm_eps {a.norm_eps:g}, context "
          f"{a.max_seq_len}, sliding window {a.sliding_window or 'none'}")
    print(f"  parameters    {_count(counts['total'])} total / {_count(counts['active'])} active "
          f"per token ({counts['total']:,} / {counts['active']:,})")
    wb = report["weight_bytes"]
    print(f"  weights       bf16 {_bytes(wb['bf16'])} | int8 {_bytes(wb['int8'])} | "
          f"int4 {_bytes(wb['int4'])} (int8/int4: matmul weights quantized, per-row / "
          f"group-128 scales; embeddings, norms, router bf16)")
    print(f"  KV cache      {_bytes(kv)} per token (bf16), {_bytes(kv * a.max_seq_len)} per "
          f"{a.max_seq_len}-token sequence")
    if "checkpoint" in report:
        c = report["checkpoint"]
        quant = f", {c['quantization']['bits']}-bit weights" if c["quantization"] else ""
        print(f"  checkpoint    layout {c['layout']} ({c['layout_description']}){quant}")
        print(f"                dtype {c['dtype']}, {c['tensors']} tensors, {_bytes(c['bytes'])} "
              f"in {len(c['files'])} file(s); config {Path(c['config']).name}")
    if "gguf" in report:
        _print_gguf(report["gguf"])
    return 0


def _gguf(target: str) -> Path | None:
    """The GGUF file `target` names (a path, or a hub id resolved to one), else None."""
    from mixtral.checkpoint.files import is_gguf
    from mixtral.hub import resolve

    path = resolve(target)
    return path if is_gguf(path) else None


def _print_gguf(g: dict[str, Any]) -> None:
    """The file, then per stored type what loading makes of it (checkpoint/ggml.py)."""
    name = f" \"{g['name']}\"" if g["name"] else ""
    kind = f", file type {g['file_type']}" if g["file_type"] else ""
    print(f"  gguf          {g['architecture']} architecture{name}{kind}: {g['tensors']} "
          f"tensors, {_bytes(g['bytes'])}")
    for row in g["tensor_types"]:
        how = "exact" if row["exact"] else "re-quantized"
        print(f"                {row['type']:<6} x{row['tensors']:<4} {_bytes(row['bytes']):>10}"
              f"  -> {row['loads_as']} ({how})")
    print(f"                computes in {g['dtype']} (--dtype to change)")


def run_convert(args: argparse.Namespace) -> int:
    from mixtral.checkpoint import convert
    from mixtral.progress import Stages

    with Stages("convert") as progress:  # on stderr, when it is a terminal
        files = convert(args.src, args.dst, args.to, args.dtype,
                        parse_size(args.shard_size, "--shard-size"), progress)
    for f in files:
        print(f)
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    from mixtral.checkpoint import quantize_checkpoint
    from mixtral.progress import Stages

    if args.layout != "portable":
        raise ValueError("--layout cpu64 is no longer written: it was PyTorch's AVX-512 packing, "
                         "which other CPUs read as garbage; files now hold one layout on every "
                         "machine and each CPU packs it at load (old cpu64 files still load)")
    with Stages("quantize") as progress:  # on stderr, when it is a terminal
        files = quantize_checkpoint(args.src, args.dst, args.bits, args.group_size,
                                    parse_size(args.shard_size, "--shard-size"), progress)
    for f in files:
        print(f)
    return 0


def run_lora(args: argparse.Namespace) -> int:
    from mixtral.assemble import assemble
    from mixtral.checkpoint import save

    model = assemble(args.base, lora=args.adapter, fast=False)  # as stored, adapter merged
    for f in save({k: v.detach() for k, v in model.state_dict().items()}, model.args, args.dst):
        print(f)
    return 0


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


if __name__ == "__main__":
    sys.exit(standalone("python -m mixtral.files", COMMANDS))
