"""Grouped-query causal self-attention with QK-norm, RoPE and document masking inside packed blocks.

Two backends, chosen per forward by the transformer (see `AttentionContext`):

* flash-attn's `flash_attn_varlen_func` when flash-attn imports, the tensors are on CUDA in fp16/bf16 and
  document_ids are given: each document of the packed [B, T] batch becomes one variable-length sequence
  (`cu_seqlens`), so no [T, T] mask is ever materialised. GQA is native to flash-attn.
* `torch.nn.functional.scaled_dot_product_attention` otherwise: `is_causal=True` without document_ids, or a
  boolean block-diagonal causal mask [B, 1, T, T] built from document_ids.

A "document" is a maximal run of equal document_ids inside a row (the data pipeline numbers documents
0, 1, 2, ... left to right, so this is the same as "equal id"); both backends use this definition, so they
agree token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.polyglu.layers import RMSNorm, apply_rope

try:  # optional: a broken CUDA build can raise more than ImportError
    from flash_attn import flash_attn_varlen_func
except (ImportError, OSError, RuntimeError):  # pragma: no cover - depends on the install
    flash_attn_varlen_func = None

FLASH_ATTN_AVAILABLE = flash_attn_varlen_func is not None


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: True where a new document begins (position 0 of every row, and every change of id)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def cu_seqlens_from_document_ids(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """flash-attn varlen boundaries for the flattened [B*T] batch.

    Returns (cu_seqlens int32 [n_docs + 1] = 0, end of doc 0, ..., B*T; max_seqlen). Documents never span
    rows: every row starts a new sequence even if its first id equals the previous row's last id.
    """
    b, t = document_ids.shape
    starts = document_starts(document_ids).flatten()
    idx = torch.nonzero(starts, as_tuple=False).flatten()
    cu = torch.cat([idx, idx.new_full((1,), b * t)]).to(torch.int32)
    max_seqlen = int((cu[1:] - cu[:-1]).max().item())  # one host sync per forward, not per layer
    return cu, max_seqlen


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, T, T], True = may attend: key j <= query i and both in the same document."""
    seg = torch.cumsum(document_starts(document_ids).to(torch.int32), dim=1)  # [B, T]
    t = document_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=document_ids.device).tril()
    same = seg[:, :, None] == seg[:, None, :]
    return (same & causal)[:, None, :, :]


@dataclass
class AttentionContext:
    """What every layer of one forward shares; built once by the transformer, not once per layer."""

    cos: torch.Tensor                       # fp32 [T, head_dim]
    sin: torch.Tensor                       # fp32 [T, head_dim]
    attn_mask: torch.Tensor | None = None   # bool [B, 1, T, T] (SDPA path with document_ids)
    cu_seqlens: torch.Tensor | None = None  # int32 [n_docs + 1] (flash-attn varlen path)
    max_seqlen: int = 0

    @property
    def use_flash(self) -> bool:
        return self.cu_seqlens is not None


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

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.n_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim))
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        q = apply_rope(q, ctx.cos, ctx.sin)
        k = apply_rope(k, ctx.cos, ctx.sin)

        if ctx.use_flash:
            if q.dtype not in (torch.float16, torch.bfloat16):
                # The context chose flash-attn and built no mask: SDPA here would silently drop document masking.
                raise RuntimeError(f"flash-attn path chosen but attention runs in {q.dtype}; it needs fp16/bf16")
            out = self._flash_varlen(q, k, v, ctx)
        else:
            out = self._sdpa(q, k, v, ctx)
        return self.o_proj(out.reshape(b, t, self.n_heads * self.head_dim))

    def _flash_varlen(self, q, k, v, ctx: AttentionContext) -> torch.Tensor:
        b, t = q.shape[:2]
        # [B, T, H, hd] -> [B*T, H, hd]: the flattened batch is one long sequence cut at cu_seqlens.
        out = flash_attn_varlen_func(
            q.reshape(b * t, self.n_heads, self.head_dim),
            k.reshape(b * t, self.n_kv_heads, self.head_dim),
            v.reshape(b * t, self.n_kv_heads, self.head_dim),
            cu_seqlens_q=ctx.cu_seqlens, cu_seqlens_k=ctx.cu_seqlens,
            max_seqlen_q=ctx.max_seqlen, max_seqlen_k=ctx.max_seqlen,
            dropout_p=0.0, causal=True,  # softmax_scale defaults to 1/sqrt(head_dim)
        )
        return out.view(b, t, self.n_heads, self.head_dim)

    def _sdpa(self, q, k, v, ctx: AttentionContext) -> torch.Tensor:
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, hd]
        mask = ctx.attn_mask
        groups = self.n_heads // self.n_kv_heads
        if groups > 1 and mask is not None and q.is_cuda:
            # The memory-efficient CUDA kernel (the one that takes a mask) may not support enable_gqa and SDPA
            # would fall back to the math kernel; expanding KV is cheap next to that. Same head mapping as
            # enable_gqa / flash-attn: query head h reads KV head h // groups.
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
            gqa = False
        else:
            gqa = groups > 1
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return out.transpose(1, 2)  # [B, T, H, hd]
