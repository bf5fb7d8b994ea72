"""Grouped-query causal self-attention with QK-norm (Qwen3) and RoPE; the attention itself, with document masking,
is the shared backend in models.layers.attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.layers.attention import AttentionContext, attend
from models.layers.norm import RMSNorm
from models.layers.rope import apply_rope


@dataclass
class KVCache:
    """One layer's keys (after RoPE) and values [B, T_past, H_kv, hd] from earlier decoding steps."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1)
        self.k, self.v = k, v
        return k, v


class GroupedQueryAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)
        # QK-norm (Qwen3): RMSNorm over head_dim, shared by all heads, applied before RoPE.
        self.q_norm = RMSNorm(head_dim, eps=norm_eps)
        self.k_norm = RMSNorm(head_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: KVCache | None = None) -> torch.Tensor:
        """With a `cache` (generation), this call's keys and values are appended to it and the queries attend
        to all of them, as `ctx` (models.layers.attention.cached_step_context) masks."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.n_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim))
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        q = apply_rope(q, ctx.cos, ctx.sin)
        k = apply_rope(k, ctx.cos, ctx.sin)
        if cache is not None:
            k, v = cache.extend(k, v)
        out = attend(q, k, v, ctx)
        return self.o_proj(out.reshape(b, t, self.n_heads * self.head_dim))
