"""Causal self-attention backends with document masking inside packed blocks, for any family's attention module.

Two backends, chosen once per forward by `attention_context` (see `AttentionContext`):

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

from models.layers.rope import rope_cos_sin

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


def attention_context(x: torch.Tensor, document_ids: torch.Tensor | None, head_dim: int, rope_theta: float,
                      max_seq_len: int) -> AttentionContext:
    """The RoPE tables and the document mask (or flash-attn's cu_seqlens) every layer of one forward shares."""
    t = x.shape[1]
    if t > max_seq_len:
        raise ValueError(f"sequence length {t} exceeds max_seq_len {max_seq_len}")
    cos, sin = rope_cos_sin(t, head_dim, rope_theta, device=x.device)
    ctx = AttentionContext(cos=cos, sin=sin)
    if document_ids is None:
        return ctx  # plain causal
    if document_ids.shape != x.shape[:2]:
        raise ValueError(f"document_ids {tuple(document_ids.shape)} must match input_ids {tuple(x.shape[:2])}")
    if uses_flash_attention(x):
        ctx.cu_seqlens, ctx.max_seqlen = cu_seqlens_from_document_ids(document_ids)
    else:
        ctx.attn_mask = document_causal_mask(document_ids)
    return ctx


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """Causal attention of q [B, T, H, hd] over k, v [B, T, H_kv, hd] (grouped-query when H_kv < H) within
    the documents `ctx` describes; returns [B, T, H, hd]."""
    if ctx.use_flash:
        if q.dtype not in (torch.float16, torch.bfloat16):
            # The context chose flash-attn and built no mask: SDPA here would silently drop document masking.
            raise RuntimeError(f"flash-attn path chosen but attention runs in {q.dtype}; it needs fp16/bf16")
        return _flash_varlen(q, k, v, ctx)
    return _sdpa(q, k, v, ctx)


def _flash_varlen(q, k, v, ctx: AttentionContext) -> torch.Tensor:
    b, t, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    # [B, T, H, hd] -> [B*T, H, hd]: the flattened batch is one long sequence cut at cu_seqlens.
    out = flash_attn_varlen_func(
        q.reshape(b * t, n_heads, head_dim),
        k.reshape(b * t, n_kv_heads, head_dim),
        v.reshape(b * t, n_kv_heads, head_dim),
        cu_seqlens_q=ctx.cu_seqlens, cu_seqlens_k=ctx.cu_seqlens,
        max_seqlen_q=ctx.max_seqlen, max_seqlen_k=ctx.max_seqlen,
        dropout_p=0.0, causal=True,  # softmax_scale defaults to 1/sqrt(head_dim)
    )
    return out.view(b, t, n_heads, head_dim)


def _sdpa(q, k, v, ctx: AttentionContext) -> torch.Tensor:
    groups = q.shape[2] // k.shape[2]
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, hd]
    mask = ctx.attn_mask
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


def uses_flash_attention(x: torch.Tensor) -> bool:
    """Whether document-masked attention on these activations goes through flash-attn's varlen kernel:
    flash-attn imports, x is on CUDA and the projections will run in fp16/bf16 (the kernel's only dtypes)."""
    return FLASH_ATTN_AVAILABLE and x.is_cuda and _compute_dtype(x) in (torch.float16, torch.bfloat16)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the projections will produce: autocast's when it is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
