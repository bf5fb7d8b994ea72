"""Router auxiliary losses (Switch load balancing, ST-MoE z-loss) and the assignment histogram they share."""

from __future__ import annotations

import torch
from torch import Tensor


def expert_fraction(expert_index: Tensor, num_experts: int) -> Tensor:
    """Fraction of the N*k token->expert assignments that went to each expert, [E] fp32, no gradient."""
    counts = torch.bincount(expert_index.reshape(-1), minlength=num_experts)
    return counts.float() / max(expert_index.numel(), 1)


def load_balancing_loss(routing_probs: Tensor, expert_index: Tensor, num_experts: int) -> Tensor:
    """E * sum_i f_i * P_i: 1.0 at perfect balance, E at full collapse onto one expert.

    f_i (hard counts) carries no gradient; the loss trains the router through P_i, pushing probability
    mass away from over-used experts.
    """
    f = expert_fraction(expert_index, num_experts)
    p = routing_probs.float().mean(dim=0)
    return num_experts * torch.dot(f, p)


def z_loss(logits: Tensor) -> Tensor:
    """mean(logsumexp(logits)^2): keeps router logits small so the softmax stays out of its saturated range."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
