"""Noisy top-k router: picks experts per token and produces the combine weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass
class RouterOutput:
    expert_index: Tensor  # [N, k] long: top-k of the logits actually used to route
    gates: Tensor  # [N, k]: combine weights
    logits: Tensor  # [N, E] clean (pre-noise) fp32 logits: z-loss, metrics
    probs: Tensor  # [N, E] softmax of the clean logits: entropy, metrics
    routing_probs: Tensor  # [N, E] softmax of the routing logits (noisy in training): P_i of the LB loss


class NoisyTopKRouter(nn.Module):
    def __init__(self, d_model: int, num_experts: int, topk: int, noise_std: float = 0.0):
        super().__init__()
        self.num_experts = num_experts
        self.topk = topk
        # A plain float, not a buffer: an annealing schedule rewrites it between optimizer steps and it
        # should not end up in (or be restored from) checkpoints as model state.
        self.noise_std = float(noise_std)
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> RouterOutput:
        # fp32 even under bf16/fp16 autocast: near-tied logits would otherwise flip experts from rounding
        # alone, and logsumexp**2 (z-loss) overflows fp16 easily.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        probs = logits.softmax(dim=-1)
        if self.training and self.noise_std > 0:
            routing_probs = (logits + torch.randn_like(logits) * self.noise_std).softmax(dim=-1)
        else:
            routing_probs = probs
        top_p, expert_index = routing_probs.topk(self.topk, dim=-1)
        if self.topk == 1:
            # Straight-through: the expert output enters the residual stream unscaled (as the dense MLP's
            # did, which keeps a warm start exact), while d(loss)/d(gate) still reaches the router via p.
            gates = top_p - top_p.detach() + 1.0
        else:
            gates = top_p / top_p.sum(dim=-1, keepdim=True)
        return RouterOutput(expert_index=expert_index, gates=gates, logits=logits, probs=probs,
                            routing_probs=routing_probs)
