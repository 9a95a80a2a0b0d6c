"""A training run's settings (TrainConfig), how a recipe's values become them, and the error a
run stops with (TrainingError).

Torch-free on purpose: `mixtral train` reads and checks a recipe before anything heavy loads.
Every stage (pretrain, SFT, DPO) takes the same settings; a recipe (YAML, train/recipe.py)
names the ones that differ from the defaults here. YAML is loose about types (PyYAML, YAML
1.1, reads `1e-4` as a string and `1.5` where a count belongs as a float), so each value is
brought to its field's declared type here, or refused in one line naming the key, the value
and the type wanted, before it can fail deep inside the optimizer.
"""

from __future__ import annotations

import difflib
import math
import re
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin, get_type_hints

from mixtral.config import ModelArgs


class TrainingError(ValueError):
    """What stops a run, said to its user: a bad setting or data file, a diverged run, a
    refused checkpoint. A ValueError, so the command line's one error handler
    (mixtral.command) prints it as one line with exit status 2 without knowing training."""


@dataclass
class TrainConfig:
    stage: str  # pretrain | sft | dpo
    out: str
    data: list[str]
    eval_data: list[str] = field(default_factory=list)  # default: hold out a slice of data
    init: str = "tiny"  # a preset (random weights) or a checkpoint to start from
    model: dict[str, Any] = field(default_factory=dict)  # ModelArgs changes for a preset
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    aux_coef: float | None = None  # load balancing; None: the model's (0.02 for Mixtral)
    z_coef: float = 0.0  # router z-loss
    dpo_beta: float = 0.1
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 32.0
    lora_targets: list[str] = field(default_factory=lambda: ["attention", "experts"])
    lora_base_bits: int = 0  # 8: the frozen base in int8 (its memory halves; QLoRA-style)
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 50
    keep: int = 2  # checkpoints kept besides the final one
    seed: int = 0
    autocast: str = "none"  # none | bf16
    fsdp: bool = True  # under torchrun, full training: shard parameters and optimizer state
    # train the input embedding and the output head as one matrix (saved as two equal tensors,
    # Mixtral's layout): copying a piece needs its output row to match its embedding, which an
    # untied 32000-row head of a small model does not learn in a CPU budget (issue 17)
    tie_embeddings: bool = False
    # the embeddings' lr as a multiple of lr (0: frozen; train/optimizer.py says why)
    embedding_lr_scale: float = 1.0
    # which rows a step moves while they learn: "all", or "seen": only the pieces in the step's
    # batch (its inputs and scored targets). A tied head gives every row the softmax's push,
    # which Adam makes a full-size step for rows the data never shows (train/optimizer.py); a
    # row never seen in a run stays put
    embedding_rows: str = "all"
    # "tied": each word-start piece and its unspaced twin (`\u2581Am`, `Am`: the step a JSON
    # copy takes after a quote) move as one, both by the sum of their gradients, so learning
    # rows keeps the difference between them (to rounding); "free": each on its own
    embedding_twins: str = "free"
    # the final norm's weight at a preset's random init: with std-0.02 rows (norm ~0.23 at dim
    # 128) a tied head can give a piece at most ~2.6 nats over the rest until it grows; 5 lifts
    # that cap from the first step (issue 17's pilots). A checkpoint init keeps its own.
    final_norm_init: float = 1.0
    # one random direction added to every row of a preset's random embeddings, its norm this
    # multiple of a row's (0: none). Rows with no common part give layer 0's attention nothing
    # that is the same at every position, so no head there can attend to the previous piece,
    # which an induction head needs below it. Frozen rows with 1.0 let a 2-layer pilot form
    # the whole circuit (layer 0: a previous-piece head; layer 1: induction heads), copying
    # unseen whole-vocabulary spans at 0.84-0.99 by step 3,000 (two runs); without it, 0.04
    # (issue 17's pilots, which also sampled the softmax; recipes/default/induction.yaml)
    embedding_shared: float = 0.0
    # the row of every piece that starts a word (`▁X`) becomes the row of its twin without the
    # space (`X`, where the vocabulary has one) plus one "space" direction of this multiple of
    # a row's norm (0: none; 32000-piece vocabulary only). A copy into a JSON string, after
    # `"`, must drop the space the prompt's value began with (`name: Amelia` holds `▁Am`, the
    # answer `"Amelia"` holds `Am`); with unrelated random rows that mapping would be learnt
    # piece by piece and never reach pieces unseen in training, with twins it is one direction
    embedding_space: float = 0.0
    # train against part of the vocabulary (0: the full softmax): every piece of the batch
    # plus this many drawn from the rest (train/losses.py, sampled_cross_entropy). Evaluation
    # always uses the full softmax, so eval_ce stays comparable across runs.
    sampled_softmax: int = 0
    resume: bool = True
    progress: bool = True

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Settings read from `source` (named in every error) -> a checked TrainConfig."""
        checked = {key: setting(key, value, source) for key, value in values.items()}
        missing = [k for k in ("stage", "out", "data") if k not in checked]
        if missing:
            raise TrainingError(f"{source}: missing setting(s) {', '.join(missing)}")
        cfg = cls(**checked)
        _check_ranges(cfg, source)
        return cfg


# the least value of each count (0 would divide by zero or train on nothing)
_AT_LEAST = {"steps": 1, "batch_size": 1, "grad_accum": 1, "seq_len": 1, "eval_every": 1,
            "eval_batches": 1, "save_every": 1, "warmup": 0, "keep": 0, "lora_rank": 0,
            "sampled_softmax": 0}


def _check_ranges(cfg: TrainConfig, source: str) -> None:
    def wrong(what: str) -> TrainingError:
        return TrainingError(f"{source}: {what}")

    for key, least in _AT_LEAST.items():
        if getattr(cfg, key) < least:
            raise wrong(f"{key} must be at least {least}, got {getattr(cfg, key)}")
    if cfg.stage not in ("pretrain", "sft", "dpo"):
        raise wrong(f"stage must be pretrain, sft or dpo, got {cfg.stage!r}")
    if cfg.autocast not in ("none", "bf16"):
        raise wrong(f"autocast must be none or bf16, got {cfg.autocast!r}")
    for key, values in (("embedding_rows", ("all", "seen")), ("embedding_twins", ("free", "tied"))):
        if getattr(cfg, key) not in values:
            raise wrong(f"{key} must be {' or '.join(values)}, got {getattr(cfg, key)!r}")
    shaped = (cfg.embedding_rows, cfg.embedding_twins) != ("all", "free")
    for frozen, why in ((cfg.embedding_lr_scale == 0, "embedding_lr_scale is 0"),
                        (cfg.lora_rank > 0, "LoRA (lora_rank > 0) trains adapters only")):
        if shaped and frozen:
            raise wrong(f"embedding_rows={cfg.embedding_rows} and embedding_twins="
                        f"{cfg.embedding_twins} shape how learning embedding rows move, but "
                        f"{why}: the rows are frozen (drop these settings)")
    for key, ok, wanted in (("lr", cfg.lr > 0, "above 0"),
                            ("grad_clip", cfg.grad_clip > 0, "above 0"),
                            ("weight_decay", cfg.weight_decay >= 0, "at least 0"),
                            ("embedding_lr_scale", 0 <= cfg.embedding_lr_scale < math.inf,
                             "at least 0 and finite"),
                            ("final_norm_init", 0 < cfg.final_norm_init < math.inf,
                             "above 0 and finite"),
                            ("embedding_shared", 0 <= cfg.embedding_shared < math.inf,
                             "at least 0 and finite"),
                            ("embedding_space", 0 <= cfg.embedding_space < math.inf,
                             "at least 0 and finite"),
                            ("min_lr_ratio", 0 <= cfg.min_lr_ratio <= 1, "within [0, 1]"),
                            ("betas", all(0 <= b < 1 for b in cfg.betas), "within [0, 1)")):
        if not ok:
            raise wrong(f"{key} must be {wanted}, got {getattr(cfg, key)}")
    if cfg.sampled_softmax and cfg.stage == "dpo":
        raise wrong("sampled_softmax applies to pretrain and sft (DPO compares whole "
                    "sequences' log-probabilities, which need the full softmax): set "
                    "sampled_softmax: 0")
    if cfg.sampled_softmax and cfg.lora_base_bits:
        raise wrong("sampled_softmax needs the output head in full precision and "
                    "lora_base_bits quantizes it: set one of them to 0")
    if cfg.lora_base_bits not in (0, 8):
        raise wrong(f"lora_base_bits must be 0 (as loaded) or 8, got {cfg.lora_base_bits}")
    if cfg.lora_base_bits and not cfg.lora_rank:
        raise wrong("lora_base_bits needs LoRA (lora_rank > 0): a quantized base cannot be "
                    "trained itself")
    if cfg.lora_rank and not set(cfg.lora_targets) <= {"attention", "experts"}:
        raise wrong(f"lora_targets names attention and/or experts, got {cfg.lora_targets}")


# --- values to declared types --------------------------------------------------------------------

_FIELDS = get_type_hints(TrainConfig)
_MODEL_FIELDS = get_type_hints(ModelArgs)


def setting(key: str, value: Any, source: str) -> Any:
    """`value` as the type TrainConfig declares for `key` (`model`: each entry as ModelArgs
    declares it); TrainingError naming `source`, the key, the value and the type otherwise."""
    if key not in _FIELDS:
        raise TrainingError(f"{source}: unknown setting {key!r}{_closest(str(key), _FIELDS)}")
    if key != "model":
        return _as(_FIELDS[key], value, f"{source}: {key}")
    if not isinstance(value, Mapping):
        raise _wrong(f"{source}: model", "a mapping of ModelArgs changes", value)
    changes = {}
    for name, v in value.items():
        if name not in _MODEL_FIELDS:
            raise TrainingError(f"{source}: model: unknown ModelArgs field "
                                f"{name!r}{_closest(str(name), _MODEL_FIELDS)}")
        changes[name] = _as(_MODEL_FIELDS[name], v, f"{source}: model.{name}")
    return changes


def _closest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(sorted(known))}"


def _wrong(where: str, wanted: str, value: Any) -> TrainingError:
    return TrainingError(f"{where}: expected {wanted}, got {repr(value)[:200]}")


# a decimal number as people write it: 3, -2, 1e-4, 1E-4, .5, 2.5e3 (not inf, nan or 1_0)
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_KIND = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}


def _as(hint: Any, value: Any, where: str) -> Any:
    """`value` as `hint` (int, float, bool, str, X | None, list[X], tuple[X, ...], dict)."""
    converted = _convert(hint, value)
    if converted is _NO:
        raise _wrong(where, _describe(hint), value)
    return converted


_NO = object()  # what _convert returns for a value it cannot convert


def _convert(hint: Any, value: Any) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        [inner] = [a for a in args if a is not type(None)]
        return _convert(inner, value)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        return value if isinstance(value, bool) else _NO
    if hint in (int, float):
        number = _number(value)
        if number is _NO or (hint is int and isinstance(number, float)
                             and not number.is_integer()):
            return _NO
        return int(number) if hint is int else float(number)
    if hint is str:
        return value if isinstance(value, str) else _NO
    if origin is list:
        items = [value] if isinstance(value, str) else value  # one path: a list of one
        if not isinstance(items, (list, tuple)):
            return _NO
        converted = [_convert(args[0], v) for v in items]
        return _NO if any(v is _NO for v in converted) else converted
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return _NO
        converted = [_convert(a, v) for a, v in zip(args, value, strict=True)]
        return _NO if any(v is _NO for v in converted) else tuple(converted)
    if origin is dict:
        return dict(value) if isinstance(value, Mapping) else _NO
    return value  # Any


def _number(value: Any) -> Any:
    """A finite int or float from a number or a decimal string; _NO otherwise (bools too)."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        text = value.strip()
        value = int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _NO
    return value if math.isfinite(value) else _NO


def _describe(hint: Any) -> str:
    """What a value of `hint` looks like, for errors: "an integer", "a list of strings"."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
    if origin is tuple:
        return f"a list of {len(args)} {_describe(args[0]).split(' ', 1)[1]}s"
    if origin is dict:
        return "a mapping"
    return _KIND.get(hint, str(hint))
