"""Mixture-of-Experts feed-forward layer for GPT-2 blocks: router, dispatch, aux losses, the layer."""

from models.moe.dispatch import grouped_expert_ffn, per_expert_loop_ffn
from models.moe.layer import MoEFeedForward
from models.moe.losses import expert_fraction, load_balancing_loss, z_loss
from models.moe.router import NoisyTopKRouter, RouterOutput

__all__ = [
    "MoEFeedForward", "NoisyTopKRouter", "RouterOutput", "expert_fraction", "grouped_expert_ffn",
    "load_balancing_loss", "per_expert_loop_ffn", "z_loss",
]
