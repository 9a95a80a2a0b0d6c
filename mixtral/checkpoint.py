"""Checkpoints on disk: find the files, read them strictly into a model, write them atomically.

What each layout means lives in `formats.py`; this module deals with files. Reading is strict:
an unknown or missing tensor, a shape or dtype that contradicts the config, a truncated or
corrupt file or a missing shard raises `CheckpointError` naming the file, the tensor and what
was expected. Loading builds the model on the meta device and reads every tensor straight into
its final buffer, so the weights are never held twice. The files' bytes are parsed and bounded
in `checkfile.py`, the config checked against them in `crosscheck.py` before any table sized
by it is built, and the weights' size against the free memory in `memory.py`.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import json
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from mixtral.checkfile import (
    CheckpointError,
    TensorEntry,
    load_torch_file,
    read_json,
    read_safetensors_header,
    short,
)
from mixtral.config import ModelArgs
from mixtral.crosscheck import check_config
from mixtral.formats import (
    LAYOUTS,
    QUANTIZATION_KEY,
    QUANTIZED,
    ConfigError,
    Layout,
    args_from_hf_config,
    args_from_params,
    check_quantization,
    detect_layout,
    dtype_name,
    file_tensors,
    hf_config,
    is_quantized_weight,
    params_json,
    parse_dtype,
    portable_names,
    quantized_tensors,
    read_canonical,
    write_canonical,
)
from mixtral.memory import check_fits, load_bytes
from mixtral.model import Transformer
from mixtral.quant import GROUP_SIZES, apply, default_group_size, get, quantize_weight


def _read_safetensor(entry: TensorEntry) -> Tensor:
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


def _release_pages(t: Tensor) -> None:
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
        return sum(e.dtype.itemsize * _numel(e.shape) for e in self.entries.values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _find_files(path: Path) -> tuple[Path, list[Path]]:
    """-> (config file, weight files). Decided by the files present, never by folder names."""
    if path.is_file():
        folder, weights = path.parent, [path]
    elif path.is_dir():
        folder = path
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weights = _index_shards(index)
        else:
            weights = sorted(p for p in folder.glob("*.safetensors")
                             if p.name != "consolidated.safetensors")
            weights = weights or sorted(folder.glob("consolidated.safetensors"))
            weights = weights or sorted(folder.glob("consolidated.*.pth"))
            weights = weights or sorted(folder.glob("consolidated.*.pt"))
        if not weights:
            raise CheckpointError(
                f"{path}: no weights found (looked for model.safetensors.index.json, *.safetensors,"
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


def _index_shards(index: Path) -> list[Path]:
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


def inspect(path: str | os.PathLike) -> CheckpointInfo:
    """Find a checkpoint's files and check every tensor's name, shape and dtype against its
    config, reading only headers (and, for .pt/.pth, the pickled tensor metadata)."""
    path = Path(path)
    config_file, weight_files = _find_files(path)
    args, quant = _read_config(config_file)
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
    _check_index(path, entries)
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


def _check_index(path: Path, entries: dict[str, TensorEntry]) -> None:
    index = path / "model.safetensors.index.json" if path.is_dir() else None
    if index is None or not index.exists():
        return
    for k, shard in read_json(index)["weight_map"].items():  # checked by _index_shards
        if k not in entries:
            raise CheckpointError(f"{index}: lists tensor {short(k)} in {shard}, but no shard the "
                                  "index lists holds it")
        if entries[k].file.name != shard:
            raise CheckpointError(f"{index}: lists tensor {k!r} in {shard}, but it is in "
                                  f"{entries[k].file.name}")


def _declared_dtype(config_file: Path) -> torch.dtype | None:
    cfg = read_json(config_file)  # a JSON object: _read_config checked it
    name = cfg.get("torch_dtype") or cfg.get("dtype")
    if name is None:
        return None
    try:
        return parse_dtype(name) if isinstance(name, str) else parse_dtype(repr(name))
    except ValueError:
        raise CheckpointError(f"{config_file}: unknown dtype {name!r}") from None


def reader(info: CheckpointInfo) -> Callable[[str], Tensor]:
    """read(file key) -> a fresh tensor; memory-maps one .pt/.pth file at a time."""
    torch_files: dict[Path, dict[str, Tensor]] = {}

    def read(key: str) -> Tensor:
        entry = info.entries[key]
        if entry.file.suffix == ".safetensors":
            return _read_safetensor(entry)
        if entry.file not in torch_files:
            torch_files.clear()  # keep one memory-mapped .pt file open at a time
            torch_files[entry.file] = load_torch_file(entry.file)
        mapped = torch_files[entry.file][key]
        out = mapped.clone()
        _release_pages(mapped)
        return out

    return read


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
         device: torch.device | str = "cpu") -> Transformer:
    """Load a checkpoint (HF or Mistral layout) into a model; weights keep their dtype unless
    one is asked for."""
    info = inspect(path)
    if torch.device(device).type == "cpu":
        check_fits(load_bytes(info.entries.values(), parse_dtype(dtype)), f"loading {path}",
                   "load a quantized copy (mixtral quantize), offload its experts (--max-ram)")
    with torch.device("meta"):
        model = Transformer(info.args)
    if info.quantization:
        return _load_quantized(info, model, parse_dtype(dtype), device)
    state = dict(read_state_dict(info, parse_dtype(dtype), device))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _load_quantized(info: CheckpointInfo, model: Transformer, dtype: torch.dtype | None,
                    device: torch.device | str) -> Transformer:
    """Float tensors into the model, quantized ones into the quantized modules they feed."""
    assert info.quantization is not None
    bits, group = info.quantization["bits"], info.quantization["group_size"]
    read = reader(info)
    target = dtype or info.dtype
    floats = {name: read(name).to(device=device, dtype=target)
              for name in model.state_dict() if not is_quantized_weight(name)}
    missing, _ = model.load_state_dict(floats, strict=False, assign=True)
    assert all(is_quantized_weight(m) for m in missing), missing

    return apply(model, quantized_reader(info), bits, group, target, device).eval()


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


# --- writing -------------------------------------------------------------------------------------

def _atomic_write(path: Path, write: Callable[[str], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_safetensors(tensors: dict[str, Tensor], path: str) -> None:
    save_file(tensors, path, metadata={"format": "pt"})


def _write_json(path: Path, obj: dict) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def _empty_dir(path: str | os.PathLike) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    existing = [p.name for p in out.iterdir() if p.suffix in (".safetensors", ".pt", ".pth")
                or p.name in ("config.json", "params.json", "model.safetensors.index.json")]
    if existing:
        raise CheckpointError(f"{out}: already holds a checkpoint ({', '.join(sorted(existing))});"
                              " write into an empty directory")
    return out


def _write_shards(out: Path, sizes: list[tuple[str, int]],
                  tensors: Iterator[tuple[str, Tensor]], max_shard_bytes: int) -> list[Path]:
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
    for name, keys in zip(names, plan, strict=True):
        shard = dict(itertools.islice(tensors, len(keys)))
        if list(shard) != keys:
            raise RuntimeError(f"tensors arrived out of the planned order in {name}")
        _atomic_write(out / name, functools.partial(_save_safetensors, shard))
        files.append(out / name)
        weight_map.update(dict.fromkeys(keys, name))
    if len(plan) > 1:  # the index goes last: a reader never sees it before its shards
        _write_json(out / "model.safetensors.index.json",
                    {"metadata": {"total_size": sum(n for _, n in sizes)},
                     "weight_map": weight_map})
        files.append(out / "model.safetensors.index.json")
    return files


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def save(state: dict[str, Tensor], args: ModelArgs, path: str | os.PathLike, layout: str = "hf",
         max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Write canonical tensors as an `hf` (config.json + model*.safetensors) or `mistral`
    (params.json + consolidated.safetensors) checkpoint. Every file is written atomically."""
    if layout not in ("hf", "mistral"):
        raise ValueError(f"cannot write layout {layout!r}; choose 'hf' or 'mistral'")
    out = _empty_dir(path)
    dtype = next(iter(state.values())).dtype
    tensors = list(write_canonical(LAYOUTS[layout], args, state))
    if layout == "mistral":
        _write_json(out / "params.json", params_json(args))
        _atomic_write(out / "consolidated.safetensors",
                      functools.partial(_save_safetensors, dict(tensors)))
        return [out / "params.json", out / "consolidated.safetensors"]
    _write_json(out / "config.json", hf_config(args, dtype))
    sizes = [(k, _nbytes(t)) for k, t in tensors]
    return [out / "config.json", *_write_shards(out, sizes, iter(tensors), max_shard_bytes)]


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, bits: int,
                        group_size: int | None = None,
                        max_shard_bytes: int = 5 * 2**30) -> list[Path]:
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
    out = Path(dst)

    def tensors() -> Iterator[tuple[str, Tensor]]:
        for name, t in read_state_dict(info):
            if is_quantized_weight(name):
                q, s = quantize_weight(t, bits, group_size)
                qname, sname = portable_names(name, bits)
                yield qname, q.contiguous()
                yield sname, s.contiguous()
            else:
                yield name, t

    sizes = [(k, dtype.itemsize * _numel(shape)) for k, (shape, dtype) in expected.items()]
    config = {**hf_config(info.args, info.dtype), QUANTIZATION_KEY: quant}
    return write_checkpoint(out, config, sizes, tensors(), max_shard_bytes)


def write_checkpoint(dst: str | os.PathLike, config: dict, sizes: list[tuple[str, int]],
                     tensors: Iterator[tuple[str, Tensor]],
                     max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """config.json + safetensors shards from tensors arriving one by one, in the order (and
    with the byte sizes) of `sizes`; one shard in memory at a time, every file atomic."""
    out = _empty_dir(dst)
    _write_json(out / "config.json", config)
    return [out / "config.json", *_write_shards(out, sizes, tensors, max_shard_bytes)]


_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.model.v1", "tokenizer.json",
                    "tokenizer_config.json", "special_tokens_map.json")


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str,
            dtype: torch.dtype | str | None = None, max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Read any supported layout and write `to` ('hf' or 'mistral'); tokenizer files come along."""
    info = inspect(src)
    state = dict(read_state_dict(info, parse_dtype(dtype)))
    files = save(state, info.args, dst, to, max_shard_bytes)
    folder = info.path if info.path.is_dir() else info.path.parent
    for name in _TOKENIZER_FILES:
        if (folder / name).exists():
            shutil.copyfile(folder / name, Path(dst) / name)
            files.append(Path(dst) / name)
    return files
