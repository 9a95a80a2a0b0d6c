"""The optimizer and its schedule: AdamW over two parameter groups (or three), warmup then cosine.

Matrices other than the embeddings decay; norms, biases and the embeddings do not. With
`embedding_lr_scale` other than 1 the embeddings (with a tied head, the head too) are a third
group whose lr is that multiple of the schedule's; at 0 they are frozen (train/run.py takes
them out of autograd, so they are in no group and their gradient is not clipped with the
rest). Why one would: Adam gives every row of a 32000-row table a full-size step along the
softmax's common push, even rows seen once in a thousand steps, so a small model's rare rows
drift together and blur apart; a warm-up on random pieces learns a piece-agnostic copy on
frozen random rows, which the copy stage keeps only if they stay frozen (issue 17). The groups'
order is also the optimizer state's index order, which a checkpoint written by one process
maps back to parameter names when a sharded run resumes it (train/state.py).
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
    # a group at the schedule's lr carries no lr_scale: its saved state is as it always was,
    # which a by-name resume (train/state.py) needs key for key
    groups = [{"params": [p for _, p in named], "weight_decay": decay,
               **({"lr_scale": scale} if scale != 1.0 else {})}
              for named, decay, scale in _param_groups(model, cfg)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def set_lr(opt: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> None:
    """Each group's lr for `step`: the schedule's, times the group's lr_scale where it has one."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg) * group.get("lr_scale", 1.0)


Named = list[tuple[str, torch.nn.Parameter]]


def _param_groups(model: Transformer, cfg: TrainConfig) -> list[tuple[Named, float, float]]:
    """(trainable parameters, weight decay, lr scale) per group, none empty: matrices other
    than the embeddings decay; the embeddings on their own with embedding_lr_scale != 1."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [(n, p) for n, p in trainable if p.dim() >= 2 and "tok_embeddings" not in n]
    rest = [(n, p) for n, p in trainable if not (p.dim() >= 2 and "tok_embeddings" not in n)]
    groups = [(decay, cfg.weight_decay, 1.0)]
    if cfg.embedding_lr_scale == 1.0:
        groups.append((rest, 0.0, 1.0))
    else:
        groups += [([(n, p) for n, p in rest if "tok_embeddings" not in n], 0.0, 1.0),
                   ([(n, p) for n, p in rest if "tok_embeddings" in n], 0.0,
                    cfg.embedding_lr_scale)]
    return [g for g in groups if g[0]]

