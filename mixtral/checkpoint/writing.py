"""Writing checkpoints: `save` (canonical tensors as an HF or Mistral checkpoint),
`quantize_checkpoint` (a float checkpoint's int8/int4 copy), `write_checkpoint` (config and
shards from tensors arriving one by one) and `convert` (any layout read, HF or Mistral
written). Every file goes through `mixtral.atomic`: a crash leaves no half-written file, and
an index is written after the shards it lists. Writing refuses a folder that already holds a
checkpoint.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from mixtral.atomic import atomic_write, atomic_write_text
from mixtral.checkfile import CheckpointError
from mixtral.checkpoint.files import INDEX, Progress
from mixtral.checkpoint.info import inspect
from mixtral.checkpoint.reading import read_state_dict
from mixtral.config import ModelArgs
from mixtral.configs import hf_config, params_json, parse_dtype
from mixtral.formats import (
    LAYOUTS,
    QUANTIZATION_KEY,
    canonical_shapes,
    is_quantized_weight,
    portable_names,
    quantized_tensors,
    write_canonical,
)
from mixtral.quant import GROUP_SIZES, default_group_size, get, quantize_weight

_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.model.v1", "tokenizer.json",
                    "tokenizer_config.json", "special_tokens_map.json")


def save(state: dict[str, Tensor], args: ModelArgs, path: str | os.PathLike, layout: str = "hf",
         max_shard_bytes: int = 5 * 2**30, progress: Progress | None = None) -> list[Path]:
    """Write canonical tensors as an `hf` (config.json + model*.safetensors) or `mistral`
    (params.json + consolidated.safetensors) checkpoint. Every file is written atomically."""
    if layout not in ("hf", "mistral"):
        raise ValueError(f"cannot write layout {layout!r}; choose 'hf' or 'mistral'")
    out = _empty_dir(path)
    dtype = next(iter(state.values())).dtype
    tensors = list(write_canonical(LAYOUTS[layout], args, state))
    if layout == "mistral":
        _write_json(out / "params.json", params_json(args))
        atomic_write(out / "consolidated.safetensors",
                     functools.partial(_save_safetensors, dict(tensors)))
        return [out / "params.json", out / "consolidated.safetensors"]
    _write_json(out / "config.json", hf_config(args, dtype))
    sizes = [(k, t.numel() * t.element_size()) for k, t in tensors]
    return [out / "config.json", *_write_shards(out, sizes, iter(tensors), max_shard_bytes,
                                                progress)]


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, bits: int,
                        group_size: int | None = None,
                        max_shard_bytes: int = 5 * 2**30,
                        progress: Progress | None = None) -> list[Path]:
    """Read a float checkpoint tensor by tensor and write its int8/int4 form (the portable
    layout of mixtral.quant, the same bytes on every machine), which `load` reads directly.
    Memory: one float tensor and one shard at a time."""
    info = inspect(src)
    if info.quantization:
        raise CheckpointError(f"{src}: already quantized ({info.quantization})")
    group_size = group_size or default_group_size(info.args)
    if bits == 4 and group_size not in GROUP_SIZES:
        raise ValueError(f"group size must be one of {GROUP_SIZES}, got {group_size}")
    quant = {"bits": get(bits).bits, "group_size": group_size, "layout": "portable"}
    expected = quantized_tensors(info.args, info.dtype, quant)

    def tensors() -> Iterator[tuple[str, Tensor]]:
        for name, t in read_state_dict(info):
            if is_quantized_weight(name):
                q, s = quantize_weight(t, bits, group_size)
                qname, sname = portable_names(name, bits)
                yield qname, q.contiguous()
                yield sname, s.contiguous()
            else:
                yield name, t

    sizes = [(k, dtype.itemsize * math.prod(shape)) for k, (shape, dtype) in expected.items()]
    config = {**hf_config(info.args, info.dtype), QUANTIZATION_KEY: quant}
    return write_checkpoint(Path(dst), config, sizes, tensors(), max_shard_bytes, progress)


def write_checkpoint(dst: str | os.PathLike, config: dict, sizes: list[tuple[str, int]],
                     tensors: Iterator[tuple[str, Tensor]],
                     max_shard_bytes: int = 5 * 2**30,
                     progress: Progress | None = None) -> list[Path]:
    """config.json + safetensors shards from tensors arriving one by one, in the order (and
    with the byte sizes) of `sizes`; one shard in memory at a time, every file atomic."""
    out = _empty_dir(dst)
    _write_json(out / "config.json", config)
    return [out / "config.json", *_write_shards(out, sizes, tensors, max_shard_bytes, progress)]


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str,
            dtype: torch.dtype | str | None = None, max_shard_bytes: int = 5 * 2**30,
            progress: Progress | None = None) -> list[Path]:
    """Read any supported layout and write `to` ('hf' or 'mistral'); tokenizer files come along."""
    info = inspect(src)
    itemsize = (parse_dtype(dtype) or info.dtype).itemsize
    total = sum(math.prod(shape) * itemsize for shape in canonical_shapes(info.args).values())
    state: dict[str, Tensor] = {}
    done = 0
    for name, t in read_state_dict(info, parse_dtype(dtype)):
        state[name] = t
        done += t.numel() * t.element_size()
        if progress is not None:
            progress("reading", done, total)
    files = save(state, info.args, dst, to, max_shard_bytes, progress)
    folder = info.path if info.path.is_dir() else info.path.parent
    for name in _TOKENIZER_FILES:
        if (folder / name).exists():
            shutil.copyfile(folder / name, Path(dst) / name)
            files.append(Path(dst) / name)
    return files


def _empty_dir(path: str | os.PathLike) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    existing = [p.name for p in out.iterdir() if p.suffix in (".safetensors", ".pt", ".pth")
                or p.name in ("config.json", "params.json", INDEX)]
    if existing:
        raise CheckpointError(f"{out}: already holds a checkpoint ({', '.join(sorted(existing))});"
                              " write into an empty directory")
    return out


def _write_shards(out: Path, sizes: list[tuple[str, int]],
                  tensors: Iterator[tuple[str, Tensor]], max_shard_bytes: int,
                  progress: Progress | None = None) -> list[Path]:
    """Write tensors (arriving in the order of `sizes`) as model.safetensors, or as shards plus
    an index, holding one shard in memory at a time."""
    plan: list[list[str]] = [[]]
    size = 0
    for key, nbytes in sizes:
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(key)
        size += nbytes
    names = ["model.safetensors"] if len(plan) == 1 else \
        [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    files, weight_map = [], {}
    done, total, size_of = 0, sum(n for _, n in sizes), dict(sizes)
    for name, keys in zip(names, plan, strict=True):
        shard: dict[str, Tensor] = {}
        for key, t in itertools.islice(tensors, len(keys)):
            shard[key] = t
            done += size_of.get(key, 0)
            if progress is not None:
                progress("writing", done, total)
        if list(shard) != keys:
            raise RuntimeError(f"tensors arrived out of the planned order in {name}")
        atomic_write(out / name, functools.partial(_save_safetensors, shard))
        files.append(out / name)
        weight_map.update(dict.fromkeys(keys, name))
    if len(plan) > 1:  # the index goes last: a reader never sees it before its shards
        _write_json(out / INDEX, {"metadata": {"total_size": sum(n for _, n in sizes)},
                                  "weight_map": weight_map})
        files.append(out / INDEX)
    return files


def _save_safetensors(tensors: dict[str, Tensor], path: Path) -> None:
    save_file(tensors, path, metadata={"format": "pt"})


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
