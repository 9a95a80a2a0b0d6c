"""What each stage trains on: a Task draws a step's batches and computes their loss.

Pretraining and SFT minimise next-token cross-entropy (SFT on the assistant's tokens, and on
every token of a plain-text row), plus the router's load-balancing and z-losses; DPO compares
the policy with a frozen reference on preference pairs. The loop (train/run.py) is the same
for all three.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor

from mixtral.lora import LoRAExperts, LoRALinear
from mixtral.model import Transformer
from mixtral.tokenizer import Tokenizer
from mixtral.train import data as D
from mixtral.train.config import TrainConfig
from mixtral.train.losses import (
    cross_entropy,
    dpo_loss,
    load_balancing_loss,
    router_z_loss,
    sampled_cross_entropy,
    sequence_logprobs,
)


class Task(Protocol):
    tokens_per_batch: int

    def batch(self, step: int, micro: int) -> Any: ...

    def loss(self, model: Transformer, batch: Any) -> tuple[Tensor, dict[str, float]]: ...

    def eval_batches(self) -> list[Any]: ...


def make_task(cfg: TrainConfig, tokenizer: Tokenizer, model: Transformer,
              aux_coef: float) -> Task:
    """The stage's task (DPO copies `model` as its reference, so build it before sharding)."""
    if cfg.stage == "pretrain":
        return PretrainTask(cfg, tokenizer, aux_coef)
    if cfg.stage == "sft":
        return SFTTask(cfg, tokenizer, aux_coef)
    return DPOTask(cfg, tokenizer, model)


def _lm_loss(model: Transformer, batch: D.Batch, cfg: TrainConfig,
             aux_coef: float) -> tuple[Tensor, dict[str, float]]:
    """Next-token loss plus the router's losses; with sampled_softmax, while training (not in
    evaluation), the cross-entropy is over the batch's pieces and a sample of the rest, logged
    as sampled_ce: an estimate of the full one (on average a little below it)."""
    sampled = cfg.sampled_softmax > 0 and model.training
    counts = batch.loss_mask.bool()
    out, router_logits = model(batch.tokens, return_router_logits=True, hidden=sampled,
                               only=counts)  # [M, D] states or [M, V] logits: where loss counts
    targets = batch.targets[counts]  # [M]
    if not len(targets):
        ce = out.sum() * 0.0  # nothing counts in this batch: a zero that keeps the graph
    elif sampled:
        ce = sampled_cross_entropy(out, model.output.weight, targets, None, batch.tokens,
                                   cfg.sampled_softmax, torch.Generator().manual_seed(batch.key))
    else:
        ce = cross_entropy(out, targets)
    loss = ce
    stats = {"sampled_ce" if sampled else "ce": ce.item()}
    if aux_coef:
        aux = load_balancing_loss(router_logits, model.args.num_experts_per_tok, batch.token_mask)
        loss = loss + aux_coef * aux
        stats["aux"] = aux.item()
    if cfg.z_coef:
        z = router_z_loss(router_logits, batch.token_mask)
        loss = loss + cfg.z_coef * z
        stats["z"] = z.item()
    return loss, stats


class PretrainTask:
    def __init__(self, cfg: TrainConfig, tokenizer: Tokenizer, aux_coef: float) -> None:
        self.cfg, self.aux_coef = cfg, aux_coef
        stream = D.pretrain_tokens(cfg.data, tokenizer)
        if cfg.eval_data:
            self.eval_stream = D.pretrain_tokens(cfg.eval_data, tokenizer)
            self.stream = stream
        else:  # hold out the last 2 % (at least two sequences)
            cut = len(stream) - max(len(stream) // 50, 2 * (cfg.seq_len + 2))
            self.stream, self.eval_stream = stream[:cut], stream[cut:]
        self.tokens_per_batch = cfg.batch_size * cfg.seq_len

    def batch(self, step: int, micro: int) -> D.Batch:
        c = self.cfg
        return D.pretrain_batch(self.stream, c.batch_size, c.seq_len, c.seed, step, micro)

    def loss(self, model: Transformer, batch: D.Batch) -> tuple[Tensor, dict[str, float]]:
        return _lm_loss(model, batch, self.cfg, self.aux_coef)

    def eval_batches(self) -> list[D.Batch]:
        c = self.cfg
        return [D.pretrain_batch(self.eval_stream, c.batch_size, c.seq_len, 12345, 0, i)
                for i in range(c.eval_batches)]


class SFTTask:
    def __init__(self, cfg: TrainConfig, tokenizer: Tokenizer, aux_coef: float) -> None:
        self.cfg, self.aux_coef = cfg, aux_coef
        rows = D.sft_examples(cfg.data, tokenizer, cfg.seq_len)
        if cfg.eval_data:
            self.rows, self.eval_rows = rows, D.sft_examples(cfg.eval_data, tokenizer, cfg.seq_len)
        else:
            cut = max(len(rows) - max(len(rows) // 20, 1), 1)
            self.rows, self.eval_rows = rows[:cut], rows[cut:] or rows[:1]
        self.tokens_per_batch = cfg.batch_size * cfg.seq_len

    def batch(self, step: int, micro: int) -> D.Batch:
        c = self.cfg
        picks = D.sample_rows(len(self.rows), c.batch_size, c.seed, step, micro)
        batch = D.pad_batch([self.rows[i] for i in picks])
        batch.key = D.batch_key(c.seed, step, micro)
        return batch

    def loss(self, model: Transformer, batch: D.Batch) -> tuple[Tensor, dict[str, float]]:
        return _lm_loss(model, batch, self.cfg, self.aux_coef)

    def eval_batches(self) -> list[D.Batch]:
        size = self.cfg.batch_size
        return [D.pad_batch(self.eval_rows[i:i + size])
                for i in range(0, min(len(self.eval_rows), size * self.cfg.eval_batches), size)]


class DPOTask:
    """Policy vs a frozen reference (the starting model; with LoRA, the adapters switched off)."""

    def __init__(self, cfg: TrainConfig, tokenizer: Tokenizer, model: Transformer) -> None:
        self.cfg = cfg
        pairs = D.preference_pairs(cfg.data, tokenizer, cfg.seq_len)
        if cfg.eval_data:
            self.pairs, self.eval_pairs = pairs, D.preference_pairs(cfg.eval_data, tokenizer,
                                                                    cfg.seq_len)
        else:
            cut = max(len(pairs) - max(len(pairs) // 10, 1), 1)
            self.pairs, self.eval_pairs = pairs[:cut], pairs[cut:] or pairs[:1]
        self.reference = None if cfg.lora_rank else copy.deepcopy(model).requires_grad_(False)
        self.tokens_per_batch = 2 * cfg.batch_size * cfg.seq_len

    def _batch(self, pairs: list[D.Pair]) -> D.Batch:
        return D.pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs])

    def batch(self, step: int, micro: int) -> D.Batch:
        c = self.cfg
        picks = D.sample_rows(len(self.pairs), c.batch_size, c.seed, step, micro)
        return self._batch([self.pairs[i] for i in picks])

    def loss(self, model: Transformer, batch: D.Batch) -> tuple[Tensor, dict[str, float]]:
        n = batch.tokens.shape[0] // 2
        logp = sequence_logprobs(model(batch.tokens), batch.targets, batch.loss_mask)
        with torch.no_grad(), _reference(model, self.reference) as ref:
            ref_logp = sequence_logprobs(ref(batch.tokens), batch.targets, batch.loss_mask)
        loss, stats = dpo_loss(logp[:n], logp[n:], ref_logp[:n], ref_logp[n:], self.cfg.dpo_beta)
        return loss, stats

    def eval_batches(self) -> list[D.Batch]:
        size = self.cfg.batch_size
        return [self._batch(self.eval_pairs[i:i + size])
                for i in range(0, min(len(self.eval_pairs), size * self.cfg.eval_batches), size)]


@contextlib.contextmanager
def _reference(model: Transformer, frozen: Transformer | None) -> Iterator[Transformer]:
    """The DPO reference: the frozen copy, or (LoRA) the model with its adapters scaled to 0."""
    if frozen is not None:
        yield frozen
        return
    adapters = [m for m in model.modules() if isinstance(m, (LoRALinear, LoRAExperts))]
    scales = [m.scaling for m in adapters]
    for m in adapters:
        m.scaling = 0.0
    try:
        yield model
    finally:
        for m, s in zip(adapters, scales, strict=True):
            m.scaling = s
