"""Writing checkpoints: `save` (canonical tensors as an HF or Mistral checkpoint),
`quantize_checkpoint` (a float checkpoint's int8/int4 copy), `write_checkpoint` (config and
shards from tensors arriving one by one) and `convert` (any layout read, HF or Mistral
written). Every file goes through `mixtral.atomic`: a crash leaves no half-written file, and
an index is written after the shards it lists. Writing refuses a folder that already holds a
checkpoint.

Everything streams: a safetensors file's header is known before its tensors arrive (their
names, shapes and dtypes are), so each tensor is written at its place in the file as it comes
and dropped. Converting holds one file tensor of the target layout at a time (plus, from a
layout with fused expert banks, the one bank being split); the bytes are those safetensors'
`save_file` writes for the same tensors.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from mixtral.atomic import atomic_write, atomic_write_text
from mixtral.checkfile import ST_DTYPES, CheckpointError
from mixtral.checkpoint.files import INDEX, Progress
from mixtral.checkpoint.info import inspect
from mixtral.checkpoint.reading import read_state_dict, reader
from mixtral.config import ModelArgs
from mixtral.configs import hf_config, params_json, parse_dtype
from mixtral.formats import (
    LAYOUTS,
    QUANTIZATION_KEY,
    Layout,
    canonical_shapes,
    file_tensors,
    is_quantized_weight,
    portable_names,
    quantized_tensors,
    read_one,
    rope_mistral_to_hf,
)
from mixtral.quant import GROUP_SIZES, default_group_size, get, quantize_weight

_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.model.v1", "tokenizer.json",
                    "tokenizer_config.json", "special_tokens_map.json")
# file tensor name -> (shape, dtype), in the order the tensors arrive
Entries = dict[str, tuple[tuple[int, ...], torch.dtype]]
# canonical name, experts (None: the whole tensor) -> that tensor or that slice of its bank
Canonical = Callable[[str, range | None], Tensor]


def save(state: dict[str, Tensor], args: ModelArgs, path: str | os.PathLike, layout: str = "hf",
         max_shard_bytes: int = 5 * 2**30, progress: Progress | None = None) -> list[Path]:
    """Write canonical tensors as an `hf` (config.json + model*.safetensors) or `mistral`
    (params.json + consolidated.safetensors) checkpoint. Every file is written atomically;
    no second copy of the weights is made (a q/k weight is permuted one at a time)."""
    dtypes = sorted({str(t.dtype) for t in state.values()})
    if len(dtypes) != 1:  # config.json and params.json name one dtype for all the weights
        raise ValueError(f"save writes weights of one dtype, got {', '.join(dtypes)}")

    def canonical(name: str, experts: range | None) -> Tensor:
        return state[name] if experts is None else state[name][experts.start:experts.stop]

    dtype = next(iter(state.values())).dtype
    return _write_layout(layout, args, dtype, path, canonical, max_shard_bytes, progress)


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, bits: int,
                        group_size: int | None = None,
                        max_shard_bytes: int = 5 * 2**30,
                        progress: Progress | None = None) -> list[Path]:
    """Read a float checkpoint tensor by tensor and write its int8/int4 form (the portable
    layout of mixtral.quant, the same bytes on every machine), which `load` reads directly.
    Memory: one float tensor at a time."""
    info = inspect(src)
    if info.quantization:
        raise CheckpointError(f"{src}: already quantized ({info.quantization})")
    group_size = group_size or default_group_size(info.args)
    if bits == 4 and group_size not in GROUP_SIZES:
        raise ValueError(f"group size must be one of {GROUP_SIZES}, got {group_size}")
    quant = {"bits": get(bits).bits, "group_size": group_size, "layout": "portable"}

    def tensors() -> Iterator[tuple[str, Tensor]]:
        for name, t in read_state_dict(info):
            if is_quantized_weight(name):
                q, s = quantize_weight(t, bits, group_size)
                qname, sname = portable_names(name, bits)
                yield qname, q.contiguous()
                yield sname, s.contiguous()
            else:
                yield name, t

    config = {**hf_config(info.args, info.dtype), QUANTIZATION_KEY: quant}
    return write_checkpoint(Path(dst), config, quantized_tensors(info.args, info.dtype, quant),
                            tensors(), max_shard_bytes, progress)


def write_checkpoint(dst: str | os.PathLike, config: dict, entries: Entries,
                     tensors: Iterator[tuple[str, Tensor]],
                     max_shard_bytes: int = 5 * 2**30,
                     progress: Progress | None = None) -> list[Path]:
    """config.json + safetensors shards from tensors arriving one by one, in the order (and
    with the shapes and dtypes) of `entries`; each is written as it arrives, every file
    atomic."""
    out = _empty_dir(dst)
    _write_json(out / "config.json", config)
    return [out / "config.json", *_write_shards(out, entries, tensors, max_shard_bytes,
                                                progress)]


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str,
            dtype: torch.dtype | str | None = None, max_shard_bytes: int = 5 * 2**30,
            progress: Progress | None = None) -> list[Path]:
    """Read any supported layout and write `to` ('hf' or 'mistral'); tokenizer files come
    along. Streams: one file tensor of `to` in memory at a time (and, from a fused layout,
    the expert bank it is cut from); `progress("writing", bytes, bytes in all)`."""
    info = inspect(src)
    if info.quantization:  # what read_state_dict said before convert streamed
        raise CheckpointError(f"{info.path}: is quantized; load it with mixtral.load")
    target = parse_dtype(dtype) or info.dtype
    files = _write_layout(to, info.args, target, dst,
                          _canonical_reader(info.layout, info.args, reader(info), target),
                          max_shard_bytes, progress)
    folder = info.path if info.path.is_dir() else info.path.parent
    for name in _TOKENIZER_FILES:
        if (folder / name).exists():
            shutil.copyfile(folder / name, Path(dst) / name)
            files.append(Path(dst) / name)
    return files


def _canonical_reader(layout: Layout, args: ModelArgs, read: Callable[[str], Tensor],
                      dtype: torch.dtype) -> Canonical:
    """canonical(name, experts) read from a checkpoint in `layout`, cast to `dtype`. A layout
    with one file tensor per expert reads only the experts asked; a fused bank (one file
    tensor for all experts) is read once and kept while its experts are asked for in turn."""
    shapes = canonical_shapes(args)
    bank: dict[str, Tensor] = {}  # the last fused bank read, by canonical name

    def make(shape: tuple[int, ...]) -> Tensor:
        return torch.empty(shape, dtype=dtype)

    def canonical(name: str, experts: range | None) -> Tensor:
        if name not in bank:
            bank.clear()  # before reading the next one: never two banks at once
        if experts is None or layout.source(name)[1] == "stack":
            return read_one(layout, args, read, make, name, shapes[name], experts)
        if name not in bank:
            bank[name] = read_one(layout, args, read, make, name, shapes[name])
        return bank[name][experts.start:experts.stop]

    return canonical


def _target_tensors(layout: Layout, args: ModelArgs,
                    canonical: Canonical) -> Iterator[tuple[str, Tensor]]:
    """(file key, tensor) of an `hf` or `mistral` layout, one at a time, in the order of
    `file_tensors`: an expert bank as one tensor per expert, q/k in the layout's row order."""
    for name in canonical_shapes(args):
        key, transform, _ = layout.source(name)
        if transform == "stack":
            for e in range(args.num_experts):
                yield key.format(e=e), canonical(name, range(e, e + 1))[0]
        elif transform == "rope":
            yield key, rope_mistral_to_hf(canonical(name, None), args.head_dim)
        elif transform == "same":
            yield key, canonical(name, None)
        else:
            raise ValueError(f"writing the {layout.name!r} layout is not supported; "
                             "write 'hf' or 'mistral'")


def _write_layout(layout: str, args: ModelArgs, dtype: torch.dtype, path: str | os.PathLike,
                  canonical: Canonical, max_shard_bytes: int,
                  progress: Progress | None) -> list[Path]:
    """The config and the weights of an `hf` or `mistral` checkpoint, streamed."""
    if layout not in ("hf", "mistral"):
        raise ValueError(f"cannot write layout {layout!r}; choose 'hf' or 'mistral'")
    out = _empty_dir(path)
    entries = {k: (shape, dtype) for k, shape in file_tensors(LAYOUTS[layout], args).items()}
    tensors = _target_tensors(LAYOUTS[layout], args, canonical)
    if layout == "mistral":  # one file, however large: Mistral's loaders read no index
        _write_json(out / "params.json", params_json(args))
        weights = out / "consolidated.safetensors"
        done = _Done(entries, progress)
        atomic_write(weights, lambda tmp: _write_safetensors(tmp, entries, tensors, done))
        return [out / "params.json", weights]
    _write_json(out / "config.json", hf_config(args, dtype))
    return [out / "config.json", *_write_shards(out, entries, tensors, max_shard_bytes,
                                                progress)]


def _empty_dir(path: str | os.PathLike) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    existing = [p.name for p in out.iterdir() if p.suffix in (".safetensors", ".pt", ".pth")
                or p.name in ("config.json", "params.json", INDEX)]
    if existing:
        raise CheckpointError(f"{out}: already holds a checkpoint ({', '.join(sorted(existing))});"
                              " write into an empty directory")
    return out


def _write_shards(out: Path, entries: Entries, tensors: Iterator[tuple[str, Tensor]],
                  max_shard_bytes: int, progress: Progress | None = None) -> list[Path]:
    """Write tensors (arriving in the order of `entries`) as model.safetensors, or as shards
    plus an index; each tensor is written as it arrives."""
    plan: list[Entries] = [{}]
    size = 0
    for key, (shape, dtype) in entries.items():
        nbytes = _nbytes(shape, dtype)
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append({})
            size = 0
        plan[-1][key] = (shape, dtype)
        size += nbytes
    names = ["model.safetensors"] if len(plan) == 1 else \
        [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    files, weight_map = [], {}
    done = _Done(entries, progress)
    for name, shard in zip(names, plan, strict=True):
        atomic_write(out / name, functools.partial(_write_safetensors, entries=shard,
                                                   tensors=tensors, done=done))
        files.append(out / name)
        weight_map.update(dict.fromkeys(shard, name))
    if len(plan) > 1:  # the index goes last: a reader never sees it before its shards
        total = sum(_nbytes(*e) for e in entries.values())
        _write_json(out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        files.append(out / INDEX)
    return files


# --- safetensors, streamed -----------------------------------------------------------------------
# safetensors' own writer needs every tensor in memory at once. Ours writes the header its
# `save_file` would (tensors ordered by dtype, as below, then by name; offsets; JSON without
# spaces, padded with spaces to 8 bytes) and then each tensor's bytes at its offset as it
# arrives, so the file is byte for byte the one `save_file` writes (tests compare them).
_ST_ORDER = ("U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
             "F8_E5M2FNUZ", "F8_E4M3FNUZ", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")
_ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}


class _Done:
    """progress("writing", bytes written, bytes in all) after each tensor, across files."""

    def __init__(self, entries: Entries, progress: Progress | None) -> None:
        self.done, self.progress = 0, progress
        self.total = sum(_nbytes(*e) for e in entries.values())

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        if self.progress is not None:
            self.progress("writing", self.done, self.total)


def _write_safetensors(path: Path, entries: Entries, tensors: Iterator[tuple[str, Tensor]],
                       done: Callable[[int], None]) -> None:
    """Take len(entries) tensors from `tensors`, which must arrive as `entries` says (name,
    shape, dtype, in order), and write them as one safetensors file at `path`."""
    order = sorted(entries, key=lambda k: (_ST_ORDER.index(_ST_NAMES[entries[k][1]]), k))
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset, offsets = 0, {}
    for key in order:
        shape, dtype = entries[key]
        offsets[key] = offset
        header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                       "data_offsets": [offset, offset + _nbytes(shape, dtype)]}
        offset += _nbytes(shape, dtype)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(start + offset)
        for expected, (shape, dtype) in entries.items():
            item = next(tensors, None)
            if item is None:
                raise RuntimeError(f"{path.name}: the tensors ran out before {expected}")
            key, t = item
            if key != expected or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise RuntimeError(f"{path.name}: expected {expected} {list(shape)} {dtype}, "
                                   f"got {key} {list(t.shape)} {t.dtype}")
            f.seek(start + offsets[key])
            f.write(_bytes(t))
            done(_nbytes(shape, dtype))
            del item, t  # before the next arrives: a slice would keep its whole bank alive


def _bytes(t: Tensor) -> memoryview:
    """A tensor's bytes in memory order (little-endian, as safetensors stores them)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
