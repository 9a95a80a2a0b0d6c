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

`RowGrad` shapes the learning rows' gradient before it is clipped: with embedding_rows "seen"
only the rows of pieces in the step's batch keep theirs (the softmax's push on the rest is
dropped, so a row never seen in a run never moves; one seen earlier still coasts on Adam's
momentum), and with embedding_twins "tied" a word-start piece and its unspaced twin share the
sum of their gradients, so that equal updates keep the difference between their rows.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from mixtral.model import Transformer
from mixtral.tokenizer import default_tokenizer
from mixtral.train.config import TrainConfig, TrainingError
from mixtral.train.data import Batch


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


class RowGrad:
    """TrainConfig.embedding_rows and embedding_twins on a step's embedding gradient: `see`
    each micro-batch, then `apply` once to the summed gradient."""

    def __init__(self, cfg: TrainConfig, rows: int) -> None:
        self.seen = torch.zeros(rows, dtype=torch.bool) if cfg.embedding_rows == "seen" else None
        self.group = _twin_groups(rows) if cfg.embedding_twins == "tied" else None

    @staticmethod
    def of(cfg: TrainConfig, model: Transformer) -> RowGrad | None:
        if (cfg.embedding_rows, cfg.embedding_twins) == ("all", "free"):
            return None
        return RowGrad(cfg, model.tok_embeddings.weight.shape[0])

    def see(self, batch: Batch) -> None:
        if self.seen is not None:  # the inputs, and the targets that are scored (`</s>`)
            self.seen[batch.tokens[batch.token_mask.bool()]] = True
            self.seen[batch.targets[batch.loss_mask.bool()]] = True

    def apply(self, grad: Tensor | None, world: int = 1) -> None:
        """Shape `grad` ([V, dim], the embeddings' gradient, already averaged over ranks) in
        place, and forget what was seen."""
        if self.seen is not None:
            if world > 1:  # a row any rank saw learns on every rank
                seen = self.seen.to(torch.uint8)
                dist.all_reduce(seen, op=dist.ReduceOp.MAX)
                self.seen = seen.bool()
            if grad is not None:
                grad[~self.seen] = 0
            self.seen.zero_()
        if self.group is not None and grad is not None:
            sums = torch.zeros_like(grad).index_add_(0, self.group, grad)  # [groups <= V, dim]
            grad.copy_(sums[self.group])


def _twin_groups(rows: int) -> Tensor:
    """Each row's group: a word-start piece and its twin without the space are one group
    (`\u2581\u2581` -> `\u2581`, so chains join too); every other piece is a group alone."""
    tok = default_tokenizer()
    if rows != len(tok.pieces()):
        raise TrainingError(f"embedding_twins=tied needs the tokenizer's {len(tok.pieces())}-"
                            f"piece vocabulary, the model has {rows} rows")
    parent = list(range(rows))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for spaced, bare in tok.twins().items():
        parent[root(spaced)] = root(bare)
    return torch.tensor([root(i) for i in range(rows)])
