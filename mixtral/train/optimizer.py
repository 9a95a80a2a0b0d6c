"""The optimizer and its schedule: AdamW over two parameter groups, warmup then cosine.

Matrices other than the embeddings decay; norms, biases and the embeddings do not. The
groups' order is also the optimizer state's index order, which a checkpoint written by one
process maps back to parameter names when a sharded run resumes it (train/state.py).
"""

from __future__ import annotations

import math

import torch

from mixtral.model import Transformer
from mixtral.train.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, rest = _param_groups(model)
    return torch.optim.AdamW([{"params": [p for _, p in decay], "weight_decay": cfg.weight_decay},
                              {"params": [p for _, p in rest], "weight_decay": 0.0}],
                             lr=cfg.lr, betas=cfg.betas)


Named = list[tuple[str, torch.nn.Parameter]]


def _param_groups(model: Transformer) -> tuple[Named, Named]:
    """(decayed, not decayed) trainable parameters: matrices other than the embeddings decay."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [(n, p) for n, p in trainable if p.dim() >= 2 and "tok_embeddings" not in n]
    rest = [(n, p) for n, p in trainable if not (p.dim() >= 2 and "tok_embeddings" not in n)]
    return decay, rest


def grouped_names(model: Transformer) -> list[str]:
    """Parameter names in the optimizer's index order."""
    decay, rest = _param_groups(model)
    return [n for n, _ in decay + rest]
