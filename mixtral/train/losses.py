"""Losses as plain functions of tensors.

The load-balancing loss keeps the scale of Hugging Face's Mixtral loss (E * sum over experts of
the share of routed (token, slot) pairs times the mean router probability; k at perfect balance,
so the hub config's coefficient 0.02 transfers) but fixes its known faults: it is computed per
layer and averaged instead of pooled across layers, and padding is excluded.

The sampled softmax scores a state against part of the vocabulary: a small model learning to
copy spans of the whole 32000-piece vocabulary did so with it and did not with the full
softmax in the same steps (issue 17's pilots, recipes/default/induction.yaml), and it skips most
of the output head's cost, which is most of a small model's step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean next-token loss. logits [..., V], targets [...]; mask [...] (1 = counts)."""
    losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.flatten(),
                             reduction="none")
    if mask is None:
        return losses.mean()
    mask = mask.flatten().to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1)


def sampled_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor | None,
                          seen: Tensor, k: int, generator: torch.Generator | None = None
                          ) -> Tensor:
    """Mean next-token loss over part of the vocabulary. Each counted position's target is
    scored against every piece in `seen` (give the batch's tokens: each row's own context is
    the competition a copy has to win) and every target, exactly, plus k pieces drawn
    uniformly without replacement from the rest, which stand for all of it: their logits are
    raised by log(rest / k), so the softmax's sum over the rest is estimated without bias. With
    k at least the rest, it is exactly cross_entropy of the full logits.
    hidden [..., D] (the final normed states), weight [V, D] (the output rows), targets and
    mask [...] (mask: 1 = counts; None: all), seen: piece ids of any shape."""
    seen = torch.unique(torch.cat([seen.flatten(), targets.flatten()]))  # sorted
    rest = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    rest[seen] = False
    pool = rest.nonzero()[:, 0]
    drawn = pool[torch.randperm(len(pool), generator=generator)[:k].to(pool.device)]
    counts = (torch.ones_like(targets, dtype=torch.bool) if mask is None else mask.bool()).flatten()
    if not counts.any():
        return hidden.sum() * 0.0  # nothing counts: a zero that still has a graph
    states = hidden.reshape(-1, hidden.shape[-1])[counts].float()  # [M, D]
    logits = states @ weight[torch.cat([seen, drawn])].float().T  # [M, |seen| + k]
    shift = torch.zeros(logits.shape[1], device=logits.device)
    if len(drawn):
        shift[len(seen):] = math.log(len(pool) / len(drawn))
    return F.cross_entropy(logits + shift, torch.searchsorted(seen, targets.flatten()[counts]))


def load_balancing_loss(router_logits: list[Tensor], top_k: int,
                        mask: Tensor | None = None) -> Tensor:
    """Per-layer load-balancing loss, averaged over layers. router_logits: one [N, E] per layer
    (N = B*T tokens); mask [B, T] or [N] marks real tokens (padding excluded). Equals top_k when
    routing is perfectly balanced."""
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
        chosen = probs.topk(top_k, dim=-1).indices  # [N, k]
        assigned = F.one_hot(chosen, probs.shape[-1]).float()  # [N, k, E]
        if mask is None:
            f = assigned.mean(dim=0)  # [k, E]: share of slot-k assignments per expert
            p = probs.mean(dim=0)  # [E]
        else:
            m = mask.flatten().float()
            total = m.sum().clamp(min=1)
            f = (assigned * m[:, None, None]).sum(dim=0) / total
            p = (probs * m[:, None]).sum(dim=0) / total
        losses.append(probs.shape[-1] * (f * p[None]).sum())
    return torch.stack(losses).mean()


def router_z_loss(router_logits: list[Tensor], mask: Tensor | None = None) -> Tensor:
    """Mean squared log-sum-exp of the router logits (ST-MoE), averaged over layers."""
    losses = []
    for logits in router_logits:
        z = torch.logsumexp(logits.float(), dim=-1).pow(2)  # [N]
        if mask is None:
            losses.append(z.mean())
        else:
            m = mask.flatten().float()
            losses.append((z * m).sum() / m.sum().clamp(min=1))
    return torch.stack(losses).mean()


def sequence_logprobs(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Sum of log p(target) over the masked positions of each row: [B]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets[..., None]).squeeze(-1)  # [B, T]
    return (picked * mask.to(picked.dtype)).sum(dim=-1)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
             ref_rejected: Tensor, beta: float = 0.1) -> tuple[Tensor, dict[str, float]]:
    """Direct preference optimisation (Rafailov et al.): -log sigmoid(beta * (policy margin -
    reference margin)), from summed response log-probs [B]. Returns the loss and the logged
    rewards, margin and preference accuracy."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    stats = {"reward_chosen": chosen_reward.mean().item(),
             "reward_rejected": rejected_reward.mean().item(),
             "reward_margin": margin.mean().item(),
             "preference_accuracy": (margin > 0).float().mean().item()}
    return loss, stats
