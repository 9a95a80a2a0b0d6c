"""GGUF files (llama.cpp's format) of Mixtral's architecture, read into our model.

llama.cpp writes Mixtral as its "llama" architecture with experts: the shape in `llama.*`
metadata, the vocabulary in `tokenizer.ggml.*`, and tensors named `blk.{l}.attn_q.weight`,
`blk.{l}.ffn_gate_exps.weight` (experts stacked; files from before April 2024 keep one tensor
per expert, `blk.{l}.ffn_gate.{e}.weight`, and both are read). Its converter reorders the rows
of wq/wk from Hugging Face's rotate-half RoPE back into Meta's interleaved pairs, which is our
canonical order, so they are used as stored. The tensors' types are mapped in ggml.py: float
as stored, Q4_0/Q4_1/Q4_K exactly into our int4, the rest re-quantized with the loss kept and
announced.

A GGUF file is untrusted like any checkpoint: the header's counts are checked against the file's
size before the gguf package parses it, every error of that parser becomes a CheckpointError,
the shape must be Mixtral's, every tensor's name, type and shape must be the ones that shape
implies, and the vocabulary must be Mixtral's (the 32000-piece SentencePiece v1), since the
tokenizer we run is that one.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType, ReaderTensor
from torch import Tensor, nn

from mixtral import quant
from mixtral.checkfile import CheckpointError, short
from mixtral.checkpoint.files import MAGIC, Progress
from mixtral.checkpoint.ggml import FLOATS, Loss, Stored, as_float, convert, form, target_bits
from mixtral.config import ModelArgs
from mixtral.configs import ConfigError, args_from_hf_config, dtype_name
from mixtral.formats import canonical_shapes, is_quantized_weight
from mixtral.memory import check_fits
from mixtral.model import Transformer

_EXPERTS = {"w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}
_NAMES = {  # canonical (after `layers.{l}.` for per-layer ones) -> GGUF tensor name
    "tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
    "output.weight": "output.weight", "attention_norm.weight": "blk.{l}.attn_norm.weight",
    "attention.wq.weight": "blk.{l}.attn_q.weight", "attention.wk.weight": "blk.{l}.attn_k.weight",
    "attention.wv.weight": "blk.{l}.attn_v.weight",
    "attention.wo.weight": "blk.{l}.attn_output.weight",
    "ffn_norm.weight": "blk.{l}.ffn_norm.weight",
    "feed_forward.gate.weight": "blk.{l}.ffn_gate_inp.weight",
    **{f"feed_forward.experts.{w}": f"blk.{{l}}.{g}_exps.weight" for w, g in _EXPERTS.items()},
}


@dataclass
class GgufInfo:
    path: Path
    args: ModelArgs
    tensors: dict[str, ReaderTensor]  # by GGUF name
    per_expert: bool  # one tensor per expert (files before April 2024)
    meta: dict[str, Any]  # the metadata, less tokenizer.*

    def kind(self, name: str) -> GGMLQuantizationType:
        return self.sources(name)[0].tensor_type

    def quantized(self, name: str) -> bool:
        """Whether canonical weight `name` loads into one of our quantized formats: a matmul
        weight stored quantized, unless it is an expert bank of a layer that stores another
        bank as float (then the layer's banks all load as float: an expert bank is one kind)."""
        if not is_quantized_weight(name) or self.kind(name) in FLOATS:
            return False
        layer = name.rsplit(".", 1)[0]
        return ".experts." not in name or all(self.kind(f"{layer}.{w}") not in FLOATS
                                              for w in _EXPERTS)

    def sources(self, name: str) -> list[ReaderTensor]:
        """The file tensors holding canonical tensor `name` (one per expert in old files)."""
        layer, suffix = (name.split(".", 2)[1:] if name.startswith("layers.") else ("", name))
        if self.per_expert and suffix.startswith("feed_forward.experts."):
            g = _EXPERTS[suffix.rsplit(".", 1)[1]]
            return [self.tensors[f"blk.{layer}.{g}.{e}.weight"]
                    for e in range(self.args.num_experts)]
        return [self.tensors[_NAMES[suffix].replace("{l}", layer)]]

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype unless one is asked for: the float type of a float file (as
        stored), bf16 for a quantized one (as our own int8/int4 checkpoints)."""
        kind = self.sources("output.weight")[0].tensor_type
        return FLOATS[kind] if kind in FLOATS else torch.bfloat16


def open_gguf(path: Path) -> GgufInfo:
    """The file's header, shape, vocabulary and tensor table, each checked; no weights read."""
    _check_header(path)
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the parser raises many kinds for a corrupt file
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: "
                              f"{short(str(e), 160)})") from None
    meta = {k: _value(f) for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    args = _args(path, meta, _check_vocabulary(path, reader) or _embedding_rows(reader))
    tensors = {t.name: t for t in reader.tensors}
    per_expert = "blk.0.ffn_gate.0.weight" in tensors
    info = GgufInfo(path, args, tensors, per_expert, meta)
    expected: dict[str, tuple[int, ...]] = {}
    for name, shape in canonical_shapes(args).items():
        try:
            found = info.sources(name)
        except KeyError as e:
            raise CheckpointError(f"{path}: tensor {e.args[0]!r} is missing (a Mixtral of "
                                  f"{args.n_layers} layers, {args.num_experts} experts)") from None
        for t in found:
            expected[t.name] = shape[1:] if len(found) > 1 else shape
    for name, t in tensors.items():
        if name not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {short(name)} for a Mixtral of "
                                  f"{args.n_layers} layers (llama architecture with experts)")
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists the fastest dim first
        if shape != expected[name]:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {list(shape)}, but the "
                                  f"file's metadata implies {list(expected[name])}")
    return info


def load_gguf(path: Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
              announce: Callable[[str], None] | None = None,
              progress: Progress | None = None) -> Transformer:
    """The model a GGUF file holds: floats as stored (or in `dtype`), quantized types in the
    nearest of our formats (ggml.py); `announce` is told what became of each type, and
    `progress("loading", bytes read, the file's tensor bytes)` after each tensor."""
    info = open_gguf(path)
    target = dtype or info.dtype
    size, done = sum(int(t.n_bytes) for t in info.tensors.values()), 0
    check_fits(_load_bytes(info, target), f"loading {path}",
               "pick a smaller quantization of this model")
    with torch.device("meta"):
        model = Transformer(info.args)
    floats: dict[str, Tensor] = {}
    quantized: dict[str, Stored] = {}
    loss = Loss()
    for name, shape in canonical_shapes(info.args).items():
        stored = _read(info, name, shape, loss)
        done += sum(int(t.n_bytes) for t in info.sources(name))
        if progress is not None:
            progress("loading", done, size)
        if stored.bits:
            quantized[name] = stored
        else:
            floats[name] = stored.tensors[0].to(device=device, dtype=target)
    model.load_state_dict(floats, strict=False, assign=True)
    _swap(model, quantized, target, device)
    if announce is not None:
        announce(f"{path.name}: {loss.summary()}")
    return model.eval()


def _read(info: GgufInfo, name: str, shape: tuple[int, ...], loss: Loss) -> Stored:
    """Canonical tensor `name` in our terms (ggml.py), from its file tensor(s)."""
    try:
        return _stored(info, name, shape, loss)
    except NotImplementedError:  # a type newer than this gguf package, or none it decodes
        kinds = sorted({t.tensor_type.name for t in info.sources(name)})
        raise CheckpointError(f"{info.path}: {name} is stored as {', '.join(kinds)}, which the "
                              "installed gguf package cannot decode (pip install -U gguf)"
                              ) from None


def _stored(info: GgufInfo, name: str, shape: tuple[int, ...], loss: Loss) -> Stored:
    found = info.sources(name)
    kinds = {t.tensor_type for t in found}
    if len(kinds) > 1:
        raise CheckpointError(f"{info.path}: the experts of {name} are stored in different "
                              f"types ({', '.join(sorted(k.name for k in kinds))})")
    each = shape if len(found) == 1 else shape[1:]  # one tensor, or one per expert
    if not info.quantized(name):  # embeddings, norms, the router, floats: float
        for t in found:
            loss.add(t.tensor_type, form(t.tensor_type, matmul=False)[0])
        floats = [as_float(t.data, t.tensor_type, each) for t in found]
        return Stored(0, (floats[0] if len(found) == 1 else torch.stack(floats),))
    if len(found) == 1:
        return convert(found[0].data, found[0].tensor_type, shape, loss)
    parts = [convert(t.data, t.tensor_type, each, loss) for t in found]
    stacked = tuple(torch.stack([p.tensors[i] for p in parts])
                    for i in range(len(parts[0].tensors)))
    return Stored(parts[0].bits, stacked, parts[0].group)


def _swap(model: Transformer, quantized: dict[str, Stored], dtype: torch.dtype,
          device: torch.device | str) -> None:
    """Each quantized weight's module into the model, each in its own format."""
    def linear(st: Stored) -> nn.Module:
        q, s = (t.to(device) for t in st.tensors)
        return quant.get(st.bits).linear(q, s, st.group, dtype)

    for name, st in quantized.items():
        if ".experts." not in name:  # output.weight -> ("", "output"): the model itself
            parent, _, attr = name.removesuffix(".weight").rpartition(".")
            setattr(model.get_submodule(parent), attr, linear(st))
    for i in range(len(model.layers)):
        banks = {w: quantized.get(f"layers.{i}.feed_forward.experts.{w}") for w in _EXPERTS}
        stored = {w: b for w, b in banks.items() if b is not None}
        if not stored:  # the layer's banks are float (GgufInfo.quantized)
            continue
        # each bank in its own format: Q4_K_M keeps gate/up in Q4_K (int4), down in Q6_K (int8)
        pairs = {w: (b.tensors[0].to(device), b.tensors[1].to(device)) for w, b in stored.items()}
        model.get_submodule(f"layers.{i}.feed_forward").experts = quant.QuantExperts(
            pairs, {w: quant.get(b.bits) for w, b in stored.items()},
            {w: b.group for w, b in stored.items()}, dtype)


def _load_bytes(info: GgufInfo, dtype: torch.dtype) -> int:
    """What the model will take: float tensors in `dtype`, int8 a byte a weight, int4 half."""
    total = 0
    for name, shape in canonical_shapes(info.args).items():
        numel = int(np.prod(shape))
        if not info.quantized(name):
            total += numel * dtype.itemsize
        else:
            total += numel if target_bits(info.kind(name)) == 8 else numel // 2 + numel // 8
    return total


def describe(info: GgufInfo) -> dict[str, Any]:
    """What `mixtral info` says of a GGUF file: its name and file type as llama.cpp recorded
    them, and per stored type (and what it becomes) the tensors and bytes, as loading would
    map them, with no weights read."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for name in canonical_shapes(info.args):
        matmul = info.quantized(name) or (is_quantized_weight(name) and info.kind(name) in FLOATS)
        for t in info.sources(name):
            target, exact = form(t.tensor_type, matmul)
            row = rows.setdefault((t.tensor_type.name, target), {
                "type": t.tensor_type.name, "tensors": 0, "bytes": 0, "loads_as": target,
                "exact": exact})
            row["tensors"] += 1
            row["bytes"] += int(t.n_bytes)
    file_type = info.meta.get("general.file_type")
    try:
        kind = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None \
            else None
    except ValueError:
        kind = f"unknown ({file_type})"
    return {"file": str(info.path), "bytes": info.path.stat().st_size,
            "architecture": info.meta.get("general.architecture"),
            "name": info.meta.get("general.name"), "file_type": kind,
            "per_expert_tensors": info.per_expert, "tensors": len(info.tensors),
            "dtype": dtype_name(info.dtype),
            "tensor_types": sorted(rows.values(), key=lambda r: -r["bytes"])}


def _check_header(path: Path) -> None:
    """Magic, version and counts against the file's size, before any parser trusts them."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (too short, or no GGUF magic)")
    version, tensors, fields = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version}; versions 2 and 3 are read")
    if tensors * 24 + fields * 12 > size:  # each entry takes at least that many bytes
        raise CheckpointError(f"{path}: the header claims {tensors} tensors and {fields} "
                              f"metadata fields, more than {size} bytes can hold: truncated or "
                              "corrupt")


def _value(field: Any) -> Any:
    try:
        return field.contents()
    except Exception:  # a malformed field: treated as absent, and named if it is needed
        return None


# config.json's field -> the GGUF key(s) that hold it, first found wins
_CONFIG_KEYS = {
    "hidden_size": ("embedding_length",), "num_hidden_layers": ("block_count",),
    "num_attention_heads": ("attention.head_count",),
    "num_key_value_heads": ("attention.head_count_kv",),
    "head_dim": ("attention.key_length", "rope.dimension_count"),
    "intermediate_size": ("expert_feed_forward_length", "feed_forward_length"),
    "num_local_experts": ("expert_count",), "num_experts_per_tok": ("expert_used_count",),
    "vocab_size": ("vocab_size",), "rope_theta": ("rope.freq_base",),
    "rms_norm_eps": ("attention.layer_norm_rms_epsilon",),
    "max_position_embeddings": ("context_length",),
}


def _args(path: Path, meta: dict[str, Any], vocab: int | None) -> ModelArgs:
    """The model's shape from `llama.*` metadata, checked as a config.json would be; `vocab`:
    the vocabulary's size where llama.vocab_size is absent (older files)."""
    arch = meta.get("general.architecture")
    if arch != "llama" or not meta.get("llama.expert_count"):
        raise CheckpointError(f"{path}: a GGUF of architecture {short(arch)}"
                              f"{' without experts' if arch == 'llama' else ''}; only Mixtral's "
                              "(llama with experts) is read")
    cfg: dict[str, Any] = {"rope_theta": 1e4, "vocab_size": vocab}  # llama.cpp's defaults
    for field, keys in _CONFIG_KEYS.items():
        found = [meta[f"llama.{k}"] for k in keys if meta.get(f"llama.{k}") is not None]
        if found:
            cfg[field] = found[0]
    try:
        return args_from_hf_config({k: v for k, v in cfg.items() if v is not None}, str(path))
    except ConfigError as e:
        message = str(e)
        for field, keys in _CONFIG_KEYS.items():
            message = message.replace(f"field {field!r}", f"llama.{keys[0]}")
        raise CheckpointError(message) from None


def _embedding_rows(reader: GGUFReader) -> int | None:
    """The vocabulary's size as the embeddings hold it ([D, V] in ggml's order)."""
    rows = [int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight"]
    return rows[0] if rows else None


def _check_vocabulary(path: Path, reader: GGUFReader) -> int | None:
    """The number of pieces of the file's vocabulary, which must be Mixtral's SentencePiece
    one, or a clear refusal: the tokenizer we run is ours."""
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None:
        return None  # no vocabulary in the file: the embeddings' shape is still checked
    model = _value(reader.fields["tokenizer.ggml.model"]) \
        if "tokenizer.ggml.model" in reader.fields else None
    tokens = _value(field)
    ours = _mixtral_pieces()
    if model != "llama" or not isinstance(tokens, list) or len(tokens) != len(ours):
        count = len(tokens) if isinstance(tokens, list) else "?"
        raise CheckpointError(f"{path}: its vocabulary ({short(model)} tokenizer, {count} "
                              f"pieces) is not Mixtral's (SentencePiece, {len(ours)} pieces); "
                              "only models with Mixtral's tokenizer are run")
    for i, (theirs, mine) in enumerate(zip(tokens, ours, strict=True)):
        if theirs != mine:
            raise CheckpointError(f"{path}: its vocabulary is not Mixtral's: piece {i} is "
                                  f"{short(theirs)} where Mixtral's is {short(mine)}; only "
                                  "models with Mixtral's tokenizer are run")
    return len(tokens)


def _mixtral_pieces() -> tuple[str, ...]:
    from mixtral.tokenizer import default_tokenizer

    return default_tokenizer().pieces()

