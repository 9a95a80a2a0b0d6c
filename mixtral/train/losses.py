"""Losses as plain functions of tensors.

The load-balancing loss keeps the scale of Hugging Face's Mixtral loss (E * sum over experts of
the share of routed (token, slot) pairs times the mean router probability; k at perfect balance,
so the hub config's coefficient 0.02 transfers) but fixes its known faults: it is computed per
layer and averaged instead of pooled across layers, and padding is excluded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean next-token loss. logits [B, T, V], targets [B, T]; mask [B, T] (1 = counts)."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    if mask is None:
        return losses.mean()
    mask = mask.flatten().to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1)


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
