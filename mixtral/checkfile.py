"""Reading untrusted checkpoint files: JSON documents and safetensors headers, checked strictly.

A checkpoint can come from anywhere, and a few bytes in it decide how much we allocate. So
every number in a file is checked against the file itself before it is used: a safetensors
header against the file's length (no tensor may claim bytes the file does not have, and the
tensors must tile the data area exactly, as the safetensors library requires), a JSON document
against a size and nesting bound (a deeply nested one would otherwise end in a RecursionError).
Each problem is a `CheckpointError` that names the file, the tensor or field, and the value; it
is a ValueError, so the CLI answers it with one line and status 2.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class CheckpointError(ValueError):
    pass


# A Mixtral header is ~100 KB and a config ~1 KB; the safetensors library refuses headers over
# 100 MB. Bounding both keeps a lying length field from making us read a whole file into memory.
MAX_HEADER_BYTES = 100_000_000
MAX_JSON_BYTES = 64 * 2**20

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
             "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int = 0  # absolute byte range in a safetensors file
    end: int = 0


def short(value: object, limit: int = 60) -> str:
    """repr(value), cut: an error message must not echo megabytes of a hostile file."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def parse_json(data: bytes, where: str) -> Any:
    """JSON from bytes; a CheckpointError, never a RecursionError, for hostile input."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{where}: JSON nested too deeply to be a checkpoint's") from None


def read_json(path: Path) -> Any:
    """A checkpoint's config, params or index file, bounded in size and nesting."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {size} bytes is too big for a checkpoint's JSON file "
                              f"(at most {MAX_JSON_BYTES})")
    return parse_json(path.read_bytes(), str(path))


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and check a safetensors header: 8-byte little-endian length, then JSON, then the
    tensors' bytes, which the header's data_offsets must cover exactly once."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short to be a safetensors file")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise CheckpointError(f"{path}: header claims {n} bytes but the file has {size}; "
                                  "the file is truncated or not safetensors")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header claims {n} bytes, over safetensors' limit of "
                                  f"{MAX_HEADER_BYTES}: a corrupt length or not safetensors")
        raw = f.read(n)
    header = parse_json(raw, f"{path}: corrupt safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - n
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _entry_fields(path, name, meta)
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        if end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {short(name)} has data_offsets [{begin}, {end}] "
                                  f"but {meta['dtype']}{list(shape)} needs {nbytes} bytes")
        if end > data_size:
            raise CheckpointError(f"{path}: tensor {short(name)} ends at byte {8 + n + end} but "
                                  f"the file has {size} bytes: the file is truncated")
        entries[name] = TensorEntry(path, dtype, shape, 8 + n + begin, 8 + n + end)
    _check_tiling(path, entries, 8 + n, size)
    return entries


def _entry_fields(path: Path, name: str,
                  meta: object) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """-> (dtype, shape, begin, end) of one header entry, each field checked for its type."""
    what = f"{path}: tensor {short(name)}"
    if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
        raise CheckpointError(f"{what} has a malformed header entry {short(meta)} (needs dtype, "
                              "shape and data_offsets)")
    if not isinstance(meta["dtype"], str) or meta["dtype"] not in ST_DTYPES:
        raise CheckpointError(f"{what} has dtype {short(meta['dtype'])}; we read "
                              f"{', '.join(ST_DTYPES)}")
    shape, offsets = meta["shape"], meta["data_offsets"]
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise CheckpointError(f"{what} has shape {short(shape)}; a shape is a list of "
                              "non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_count, offsets)) \
            or offsets[0] > offsets[1]:
        raise CheckpointError(f"{what} has data_offsets {short(offsets)}; expected [begin, end] "
                              "with 0 <= begin <= end")
    return ST_DTYPES[meta["dtype"]], tuple(shape), offsets[0], offsets[1]


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tiling(path: Path, entries: dict[str, TensorEntry], data_start: int,
                  size: int) -> None:
    """The tensors' byte ranges must follow one another from the header to the end of the
    file: an overlap means two tensors share bytes, a gap or a tail means a corrupt offset."""
    at = data_start
    for name, e in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if e.start < at:
            raise CheckpointError(f"{path}: tensor {short(name)} at bytes [{e.start}, {e.end}) "
                                  f"overlaps the tensor before it (which ends at byte {at})")
        if e.start > at:
            raise CheckpointError(f"{path}: tensor {short(name)} starts at byte {e.start}, leaving "
                                  f"bytes [{at}, {e.start}) that no tensor holds: corrupt "
                                  "data_offsets")
        at = e.end
    if at != size:
        raise CheckpointError(f"{path}: the tensors end at byte {at} but the file has {size} "
                              "bytes: corrupt data_offsets or trailing bytes")


def load_torch_file(path: Path) -> dict[str, Tensor]:
    """A .pt/.pth state dict, memory-mapped. Its pickle is read with weights_only=True, so
    nothing in it but tensors and plain containers is ever built, let alone called."""
    not_zip = _not_a_zip(path)
    if not_zip:
        raise CheckpointError(f"{path}: {not_zip}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a bad zip or pickle
        raise CheckpointError(f"{path}: {_torch_load_reason(e)}") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                           for k, v in sd.items()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict), found "
                              f"{short(sd) if not isinstance(sd, dict) else 'other values'}")
    return sd


# torch.save's format before PyTorch 1.6 opens with a pickled LONG1 of this magic number
_LEGACY_MAGIC = b"\x8a\x0a" + 0x1950A86A20F9469CFC6C.to_bytes(10, "little")


def _not_a_zip(path: Path) -> str | None:
    """Why a .pt/.pth is not the zip archive torch.save writes (which alone can be
    memory-mapped), from its first bytes, or None if it is one; nothing is unpickled."""
    with open(path, "rb") as f:
        head = f.read(32)
    if head.startswith(b"PK\x03\x04"):
        return None
    if head[:1] == b"\x80" and _LEGACY_MAGIC in head:  # 0x80: a pickle's protocol opcode
        return ("a legacy PyTorch checkpoint (torch.save before PyTorch 1.6, or with "
                "_use_new_zipfile_serialization=False: a raw pickle stream, not a zip archive), "
                "which cannot be memory-mapped and is not read; re-save it with a current "
                "PyTorch (torch.save(torch.load(f, weights_only=True), f)) or convert it to "
                "safetensors")
    if head[:1] == b"\x80":
        return ("a bare pickle stream, not a PyTorch checkpoint (torch.save writes a zip "
                "archive); refused without unpickling it")
    return ("not a PyTorch checkpoint: " + ("the file is empty" if not head else
            "torch.save writes a zip archive, and this file does not start as one") +
            " (truncated, corrupt or another format?)")


def _torch_load_reason(e: Exception) -> str:
    """torch.load's error in one short line (its own runs to a page, with advice to turn
    the safety off)."""
    text = str(e)
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsafe:
        return (f"its pickle calls {unsafe.group(1)}, which is not part of a state dict of "
                "tensors: refused without running it (a pickle can run any code)")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(e).__name__
    return ("cannot read this PyTorch checkpoint (truncated or corrupt?): "
            + (first if len(first) <= 200 else first[:200] + "..."))
