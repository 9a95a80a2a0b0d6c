"""Which files make a checkpoint, and one tensor's bytes read out of them.

A checkpoint is found by the files present, never by folder names: an index and the shards it
lists, or the safetensors / consolidated .pth / .pt weights in a folder, with the config beside
them; a GGUF file by its first bytes (checkpoint/gguf.py reads it). A tensor is read
straight into a fresh buffer (safetensors) or copied out of a memory-mapped .pt/.pth whose
pages are then given back, so no file is held beside the model.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from mixtral.checkfile import CheckpointError, TensorEntry, read_json, short

INDEX = "model.safetensors.index.json"
MAGIC = b"GGUF"  # the first bytes of a GGUF file
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
# progress(stage, bytes done, bytes in all), after each tensor: "reading", "writing", "loading"
Progress = Callable[[str, int, int], object]


def is_gguf(path: Path) -> bool:
    """A file that opens with GGUF's magic, whatever its name."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def find_files(path: Path) -> tuple[Path, list[Path]]:
    """-> (config file, weight files). Decided by the files present, never by folder names."""
    if path.is_file():
        if path.suffix == ".gguf":  # not is_gguf: checkpoint/gguf.py reads the real ones
            raise CheckpointError(f"{path}: not a GGUF file: it does not start with GGUF's magic "
                                  "bytes (truncated, or another format?)")
        if path.suffix not in WEIGHT_SUFFIXES:
            known = ", ".join(WEIGHT_SUFFIXES)
            raise CheckpointError(f"{path}: not a weights file we read ({known}, or a GGUF "
                                  "file) nor a checkpoint folder")
        folder, weights = path.parent, [path]
    elif path.is_dir():
        folder = path
        index = folder / INDEX
        if index.exists():
            weights = index_shards(index)
        else:
            weights = sorted(p for p in folder.glob("*.safetensors")
                             if p.name != "consolidated.safetensors")
            weights = weights or sorted(folder.glob("consolidated.safetensors"))
            weights = weights or sorted(folder.glob("consolidated.*.pth"))
            weights = weights or sorted(folder.glob("consolidated.*.pt"))
        if not weights:
            raise CheckpointError(
                f"{path}: no weights found (looked for {INDEX}, *.safetensors,"
                " consolidated.safetensors, consolidated.*.pth, consolidated.*.pt)")
    else:
        raise CheckpointError(f"{path}: no such file or directory")
    mistral_weights = weights[0].name.startswith("consolidated")
    candidates = ["params.json", "config.json"] if mistral_weights else ["config.json"]
    for name in candidates:
        if (folder / name).exists():
            return folder / name, weights
    raise CheckpointError(f"{folder}: no {' or '.join(candidates)} beside the weights "
                          f"{weights[0].name}; the model's shape cannot be known")


def index_shards(index: Path) -> list[Path]:
    """The shards an index lists, each checked to be a file beside it."""
    doc = read_json(index)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(s, str) and s and Path(s).name == s for s in weight_map.values()):
        raise CheckpointError(f"{index}: malformed index (needs a weight_map of tensor name -> "
                              "shard file name beside the index)")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index.parent / s).exists()]
    if missing:
        raise CheckpointError(f"{index}: shard {missing[0]} is missing from {index.parent}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return [index.parent / s for s in shards]


def check_index(path: Path, entries: dict[str, TensorEntry]) -> None:
    """An index must place every tensor it lists in the shard that holds it."""
    index = path / INDEX if path.is_dir() else None
    if index is None or not index.exists():
        return
    for k, shard in read_json(index)["weight_map"].items():  # checked by index_shards
        if k not in entries:
            raise CheckpointError(f"{index}: lists tensor {short(k)} in {shard}, but no shard the "
                                  "index lists holds it")
        if entries[k].file.name != shard:
            raise CheckpointError(f"{index}: lists tensor {k!r} in {shard}, but it is in "
                                  f"{entries[k].file.name}")


def read_safetensor(entry: TensorEntry) -> Tensor:
    """One tensor of a safetensors file, read into a fresh tensor."""
    # Read straight into a fresh tensor: the page cache is not our memory, and no mmap of the
    # whole file stays alive beside the model.
    out = torch.empty(entry.shape, dtype=entry.dtype)
    nbytes = entry.end - entry.start
    if nbytes:
        buf = (ctypes.c_ubyte * nbytes).from_address(out.data_ptr())
        with open(entry.file, "rb") as f:
            f.seek(entry.start)
            if f.readinto(buf) != nbytes:
                raise CheckpointError(f"{entry.file}: short read of a tensor at byte "
                                      f"{entry.start}: the file changed while loading")
    return out


def release_pages(t: Tensor) -> None:
    """Drop a memory-mapped tensor's pages from our resident set once it has been copied, so
    that a .pt/.pth load does not count the file beside the model. The pages are clean and
    private; touching them again re-reads the file."""
    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first, last = -(-start // page) * page, end // page * page  # whole pages inside the tensor
    if last > first and hasattr(os, "sched_getaffinity"):  # Linux
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # DONTNEED


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
