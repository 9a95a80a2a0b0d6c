"""What a checkpoint holds: its config read, and every tensor's name, shape and dtype checked
against it from the headers alone, as a `CheckpointInfo` that reading and writing start from.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixtral.checkfile import (
    CheckpointError,
    TensorEntry,
    load_torch_file,
    read_json,
    read_safetensors_header,
    short,
)
from mixtral.checkpoint.files import check_index, find_files, is_gguf
from mixtral.config import ModelArgs
from mixtral.configs import (
    ConfigError,
    args_from_hf_config,
    args_from_params,
    dtype_name,
    parse_dtype,
)
from mixtral.crosscheck import check_config
from mixtral.formats import (
    QUANTIZATION_KEY,
    QUANTIZED,
    Layout,
    check_quantization,
    detect_layout,
    file_tensors,
    quantized_tensors,
)
from mixtral.hub import resolve


@dataclass
class CheckpointInfo:
    path: Path
    config_file: Path
    weight_files: list[Path]
    layout: Layout
    args: ModelArgs
    dtype: torch.dtype  # of the float weights
    entries: dict[str, TensorEntry] = field(repr=False)
    quantization: dict[str, Any] | None = None  # {"bits", "group_size", "layout"}

    @property
    def nbytes(self) -> int:
        return sum(e.dtype.itemsize * math.prod(e.shape) for e in self.entries.values())


def inspect(path: str | os.PathLike) -> CheckpointInfo:
    """Find a checkpoint's files and check every tensor's name, shape and dtype against its
    config, reading only headers (and, for .pt/.pth, the pickled tensor metadata)."""
    path = resolve(path)
    if is_gguf(path):
        raise CheckpointError(f"{path}: a GGUF file, which mixtral runs (--model of chat, "
                              "generate, serve, eval, bench) and describes (info) but does not "
                              "convert, quantize, offload (--max-ram) or shard (--tp/--ep)")
    config_file, weight_files = find_files(path)
    args, quant = _read_config(config_file)
    entries = _entries(weight_files)
    check_index(path, entries)
    declared = _declared_dtype(config_file)
    detected = QUANTIZED if quant is not None else detect_layout(set(entries))
    if detected is None:
        raise CheckpointError(f"{path}: not a Mixtral checkpoint in a known layout; it "
                              f"holds {', '.join(short(k) for k in sorted(entries)[:4])}, ... "
                              f"({len(entries)} tensors)")
    layout = detected
    check_config(config_file, args, layout, entries)  # before any table sized by the config
    if quant is not None:
        typed = quantized_tensors(args, declared or torch.bfloat16, quant)
        expected = {k: shape for k, (shape, _) in typed.items()}
    else:
        expected = file_tensors(layout, args)
    where = weight_files[0] if len(weight_files) == 1 else path
    for k in sorted(set(entries) - set(expected)):
        raise CheckpointError(f"{entries[k].file}: unexpected tensor {short(k)} for a "
                              f"{layout.name} checkpoint of {args.n_layers} layers, "
                              f"{args.num_experts} experts (config {config_file.name})")
    for k in sorted(set(expected) - set(entries)):
        raise CheckpointError(f"{where}: tensor {k!r} is missing (expected shape "
                              f"{list(expected[k])} for the {layout.name} layout)")
    first = next(iter(entries.values())).dtype
    dtype = declared or first
    for k, e in entries.items():
        if e.shape != expected[k]:
            raise CheckpointError(f"{e.file}: tensor {k!r} has shape {list(e.shape)}, but "
                                  f"{config_file.name} implies {list(expected[k])}")
        if quant is not None:
            want = typed[k][1]
            if e.dtype != want:
                raise CheckpointError(f"{e.file}: tensor {k!r} is {dtype_name(e.dtype)}, but a "
                                      f"{quant['bits']}-bit checkpoint stores it as "
                                      f"{dtype_name(want)}")
            continue
        if e.dtype != dtype:
            what = f"{config_file.name} declares {dtype_name(dtype)}" if declared else \
                f"the other tensors are {dtype_name(dtype)}"
            raise CheckpointError(f"{e.file}: tensor {k!r} is {dtype_name(e.dtype)} but {what}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise CheckpointError(f"{path}: weights are {dtype_name(dtype)}; expected a float dtype")
    if quant is not None:
        dtype = typed["tok_embeddings.weight"][1]
    return CheckpointInfo(path, config_file, weight_files, layout, args, dtype, entries, quant)


def _entries(weight_files: list[Path]) -> dict[str, TensorEntry]:
    """Every tensor of every weight file; a name in two files is an error."""
    entries: dict[str, TensorEntry] = {}
    for f in weight_files:
        if f.suffix == ".safetensors":
            found = read_safetensors_header(f)
        else:
            found = {k: TensorEntry(f, v.dtype, tuple(v.shape))
                     for k, v in load_torch_file(f).items()}
        for k, e in found.items():
            if k in entries:
                raise CheckpointError(f"tensor {short(k)} appears in both {entries[k].file} "
                                      f"and {f}")
            entries[k] = e
    return entries


def _read_config(config_file: Path) -> tuple[ModelArgs, dict[str, Any] | None]:
    """-> (model args, quantization settings or None)."""
    cfg = read_json(config_file)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object")
    try:
        if config_file.name == "params.json":
            return args_from_params(cfg, str(config_file)), None
        quant = cfg.get(QUANTIZATION_KEY)
        if quant is not None:
            quant = check_quantization(quant, str(config_file))
        return args_from_hf_config(cfg, str(config_file)), quant
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _declared_dtype(config_file: Path) -> torch.dtype | None:
    cfg = read_json(config_file)  # a JSON object: _read_config checked it
    name = cfg.get("torch_dtype") or cfg.get("dtype")
    if name is None:
        return None
    try:
        return parse_dtype(name) if isinstance(name, str) else parse_dtype(repr(name))
    except ValueError:
        raise CheckpointError(f"{config_file}: unknown dtype {name!r}") from None
