"""A training run's settings (TrainConfig) and the error a run stops with (TrainingError).

Torch-free on purpose: `mixtral train` reads and checks a recipe before anything heavy loads.
Every stage (pretrain, SFT, DPO) takes the same settings; a recipe (YAML, train/recipe.py)
names the ones that differ from the defaults here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


class TrainingError(RuntimeError):
    pass


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
    resume: bool = True
    progress: bool = True

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
        missing = [k for k in ("stage", "out", "data") if k not in values]
        if missing:
            raise ValueError(f"{source}: missing setting(s) {', '.join(missing)}")
        cfg = cls(**values)
        if cfg.lora_base_bits not in (0, 8):
            raise ValueError(f"{source}: lora_base_bits must be 0 (as loaded) or 8, got "
                             f"{cfg.lora_base_bits}")
        if cfg.lora_base_bits and not cfg.lora_rank:
            raise ValueError(f"{source}: lora_base_bits needs LoRA (lora_rank > 0): a "
                             "quantized base cannot be trained itself")
        if cfg.stage not in ("pretrain", "sft", "dpo"):
            raise ValueError(f"{source}: stage must be pretrain, sft or dpo, got {cfg.stage!r}")
        if isinstance(cfg.data, str):
            cfg.data = [cfg.data]
        if isinstance(cfg.eval_data, str):
            cfg.eval_data = [cfg.eval_data]
        cfg.betas = tuple(cfg.betas)  # type: ignore[assignment]
        return cfg
