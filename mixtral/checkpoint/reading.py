"""Tensors into models: a checkpoint's tensors read one by one in the canonical layout, and
`load`, which builds the model on the meta device and reads every weight straight into its
final buffer (float, or the int8/int4 pairs of a quantized checkpoint into the quantized
modules they feed), after checking that the weights fit in the free memory. `load` takes what
a user names (a folder, a weights file, a GGUF file, a Hugging Face repo id: mixtral.hub).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from mixtral.checkfile import CheckpointError, load_torch_file
from mixtral.checkpoint.files import Progress, is_gguf, read_safetensor, release_pages
from mixtral.checkpoint.info import CheckpointInfo, inspect
from mixtral.configs import parse_dtype
from mixtral.formats import is_quantized_weight, portable_names, read_canonical
from mixtral.hub import resolve
from mixtral.memory import check_fits, load_bytes
from mixtral.model import Transformer
from mixtral.quant import apply, get


def reader(info: CheckpointInfo) -> Callable[[str], Tensor]:
    """read(file key) -> a fresh tensor; memory-maps one .pt/.pth file at a time."""
    torch_files: dict[Path, dict[str, Tensor]] = {}

    def read(key: str) -> Tensor:
        entry = info.entries[key]
        if entry.file.suffix == ".safetensors":
            return read_safetensor(entry)
        if entry.file not in torch_files:
            torch_files.clear()  # keep one memory-mapped .pt file open at a time
            torch_files[entry.file] = load_torch_file(entry.file)
        mapped = torch_files[entry.file][key]
        out = mapped.clone()
        release_pages(mapped)
        return out

    return read


def quantized_reader(info: CheckpointInfo) -> Callable[[str], tuple[Tensor, Tensor]]:
    """canonical weight name -> its stored pair, converted to the portable layout if the file
    holds a legacy one."""
    assert info.quantization is not None
    read, fmt = reader(info), get(info.quantization["bits"])
    to_portable = fmt.layouts[info.quantization["layout"]]

    def weight(name: str) -> tuple[Tensor, Tensor]:
        qname, sname = portable_names(name, fmt.bits)
        return to_portable(read(qname)), read(sname)

    return weight


def read_state_dict(info: CheckpointInfo, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> Iterator[tuple[str, Tensor]]:
    """Yield the canonical tensors one by one, in `dtype` (default: the checkpoint's)."""
    if info.quantization:
        raise CheckpointError(f"{info.path}: is quantized; load it with mixtral.load")
    target = dtype or info.dtype

    def make(shape: tuple[int, ...]) -> Tensor:
        return torch.empty(shape, dtype=target, device=device)

    yield from read_canonical(info.layout, info.args, reader(info), make)


def load(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
         device: torch.device | str = "cpu", announce: Callable[[str], None] | None = None,
         progress: Progress | None = None) -> Transformer:
    """Load a checkpoint (HF or Mistral layout, ours quantized, or GGUF) into a model; weights
    keep their dtype unless one is asked for. `announce` is told how a GGUF's types were
    mapped (what was exact, what lost how much); `progress("loading", bytes read, bytes in
    all)` after each tensor."""
    path = resolve(path)
    count = progress or (lambda stage, done, total: None)
    if is_gguf(path):
        from mixtral.checkpoint.gguf import load_gguf

        return load_gguf(path, parse_dtype(dtype), device, announce, count)
    info = inspect(path)
    if torch.device(device).type == "cpu":
        check_fits(load_bytes(info.entries.values(), parse_dtype(dtype)), f"loading {path}",
                   "load a quantized copy (mixtral quantize), offload its experts (--max-ram)")
    with torch.device("meta"):
        model = Transformer(info.args)
    if info.quantization:
        return _load_quantized(info, model, parse_dtype(dtype), device, count)
    state = dict(_counted(read_state_dict(info, parse_dtype(dtype), device), info.nbytes, count))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _counted(tensors: Iterable[tuple[str, Tensor]], total: int,
             progress: Progress) -> Iterator[tuple[str, Tensor]]:
    """The tensors, each reported read (in the file's bytes: a cast does not change them)."""
    done = 0
    for name, t in tensors:
        done = min(total, done + t.numel() * t.element_size())
        progress("loading", done, total)
        yield name, t
    progress("loading", total, total)


def _load_quantized(info: CheckpointInfo, model: Transformer, dtype: torch.dtype | None,
                    device: torch.device | str, progress: Progress) -> Transformer:
    """Float tensors into the model, quantized ones into the quantized modules they feed."""
    assert info.quantization is not None
    bits, group = info.quantization["bits"], info.quantization["group_size"]
    read = reader(info)
    target = dtype or info.dtype
    floats = {name: read(name).to(device=device, dtype=target)
              for name in model.state_dict() if not is_quantized_weight(name)}
    missing, _ = model.load_state_dict(floats, strict=False, assign=True)
    assert all(is_quantized_weight(m) for m in missing), missing
    pairs, done = quantized_reader(info), sum(f.nbytes for f in floats.values())

    def weight(name: str) -> tuple[Tensor, Tensor]:
        nonlocal done
        q, s = pairs(name)
        done = min(info.nbytes, done + q.nbytes + s.nbytes)
        progress("loading", done, info.nbytes)
        return q, s

    model = apply(model, weight, bits, group, target, device)
    progress("loading", info.nbytes, info.nbytes)
    return model.eval()
