"""Causal self-attention backends with document masking inside packed blocks, for any family's attention module.

The backend is chosen once per forward by `document_context` / `attention_context` (see `AttentionContext`)
and `varlen_backend`:

* a variable-length kernel when document_ids are given and the tensors are on CUDA in fp16/bf16: each document
  of the packed [B, T] batch becomes one sequence of the flattened batch (`cu_seqlens`), so no [T, T] mask is
  ever materialised. Preferred: PyTorch's own `torch.nn.attention.varlen.varlen_attn` (PyTorch 2.9+, no extra
  install, GPUs of compute capability 8.0+; its keywords changed across releases and `_torch_varlen` speaks
  each one's); it has no dropout, so attention dropout in training falls to flash-attn's
  `flash_attn_varlen_func` when flash-attn is installed (the `flash` extra). GQA works with both.
* `torch.nn.functional.scaled_dot_product_attention` otherwise (CPU, fp32, older torch without varlen_attn
  and no flash-attn, or dropout without flash-attn): `is_causal=True` without document_ids, or a boolean
  block-diagonal causal mask [B, 1, T, T] built from document_ids. On a CUDA run in fp16/bf16 that fallback
  is logged once, with the reason and the fix: the mask costs O(T^2) memory per row.

A "document" is a maximal run of equal document_ids inside a row (the data pipeline numbers documents
0, 1, 2, ... left to right, so this is the same as "equal id"); every backend uses this definition, so they
agree token for token.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from models.layers.kernels import cuda_capability, say_once
from models.layers.rope import rope_cos_sin, rope_cos_sin_at

try:  # optional: a broken CUDA build can raise more than ImportError
    from flash_attn import flash_attn_varlen_func
except (ImportError, OSError, RuntimeError):  # pragma: no cover - depends on the install
    flash_attn_varlen_func = None

FLASH_ATTN_AVAILABLE = flash_attn_varlen_func is not None

try:  # PyTorch's own varlen kernel (2.9+); older torch falls back to flash-attn or masked SDPA
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - depends on the install
    varlen_attn = None

log = logging.getLogger(__name__)


@cache
def _keywords(fn) -> frozenset[str]:
    """The parameter names of a varlen_attn: 2.9 spells causal `is_causal` and has no `scale`; 2.10 added `scale`
    and `window_size`; 2.12 added `enable_gqa`."""
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
        return frozenset()


def _usable(fn) -> bool:
    """A varlen_attn that can be told "causal" one way or the other; any other falls back."""
    return fn is not None and bool({"is_causal", "window_size"} & _keywords(fn))


TORCH_VARLEN_AVAILABLE = _usable(varlen_attn)

# The variable-length kernels `varlen_backend` can pick (None there means masked / causal SDPA).
TORCH_VARLEN = "torch_varlen"
FLASH_ATTN = "flash_attn"


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


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Long [B, T]: each token's position inside its own document (0 at every document start)."""
    t = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    start = torch.where(document_starts(document_ids), t, torch.zeros_like(t)).cummax(dim=1).values
    return t - start


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

    cos: torch.Tensor | None = None         # fp32 [T, head_dim] (RoPE; None for a family with learned positions)
    sin: torch.Tensor | None = None         # fp32 [T, head_dim]
    attn_mask: torch.Tensor | None = None   # bool [B, 1, T, T] (SDPA path with document_ids)
    cu_seqlens: torch.Tensor | None = None  # int32 [n_docs + 1] (varlen paths)
    max_seqlen: int = 0
    varlen: str | None = None               # TORCH_VARLEN or FLASH_ATTN when cu_seqlens is set

    @property
    def use_varlen(self) -> bool:
        return self.cu_seqlens is not None


def document_context(x: torch.Tensor, document_ids: torch.Tensor | None, dropout_p: float = 0.0) -> AttentionContext:
    """The document mask (or a varlen kernel's cu_seqlens) every layer of one forward shares, without RoPE tables.
    `x` is any activation [B, T, ...] in the dtype the attention projections see; `dropout_p` the attention
    dropout of this forward (0 in eval), which rules out torch's varlen kernel (it has none)."""
    ctx = AttentionContext()
    if document_ids is None:
        return ctx  # plain causal
    if document_ids.shape != x.shape[:2]:
        raise ValueError(f"document_ids {tuple(document_ids.shape)} must match input_ids {tuple(x.shape[:2])}")
    ctx.varlen = varlen_backend(x, dropout_p)
    if ctx.varlen is not None:
        ctx.cu_seqlens, ctx.max_seqlen = cu_seqlens_from_document_ids(document_ids)
    else:
        ctx.attn_mask = document_causal_mask(document_ids)
    return ctx


def attention_context(x: torch.Tensor, document_ids: torch.Tensor | None, head_dim: int, rope_theta: float,
                      max_seq_len: int, positions: torch.Tensor | None = None) -> AttentionContext:
    """The RoPE tables and the document mask (or a varlen kernel's cu_seqlens) every layer of one forward shares.
    `positions` [B, T] gives each row its own RoPE positions (a left-padded row's tokens start at 0); by default
    every row counts 0..T-1."""
    t = x.shape[1]
    if t > max_seq_len:
        raise ValueError(f"sequence length {t} exceeds max_seq_len {max_seq_len}")
    ctx = document_context(x, document_ids)
    if positions is None:
        ctx.cos, ctx.sin = rope_cos_sin(t, head_dim, rope_theta, device=x.device)
    else:
        ctx.cos, ctx.sin = rope_cos_sin_at(positions, head_dim, rope_theta)
    return ctx


def cached_step_context(attention_mask: torch.Tensor, new_positions: torch.Tensor, head_dim: int,
                        rope_theta: float) -> AttentionContext:
    """The context of a decoding step over a KV cache: the n new tokens (all real) at `new_positions` [B, n]
    attend to every earlier token of their row that is not padding (attention_mask [B, T_total], 1 = token,
    with the new ones last) and causally among themselves; masked SDPA, as the query length differs from the
    keys'."""
    n, total = new_positions.shape[1], attention_mask.shape[1]
    key = torch.arange(total, device=attention_mask.device)
    query = torch.arange(total - n, total, device=attention_mask.device)
    causal = key[None, :] <= query[:, None]                             # [n, T_total]
    mask = attention_mask.bool()[:, None, None, :] & causal[None, None]  # [B, 1, n, T_total]
    cos, sin = rope_cos_sin_at(new_positions, head_dim, rope_theta)
    return AttentionContext(cos=cos, sin=sin, attn_mask=mask)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, dropout_p: float = 0.0,
           scale: float | None = None) -> torch.Tensor:
    """Causal attention of q [B, T, H, hd] over k, v [B, T, H_kv, hd] (grouped-query when H_kv < H) within
    the documents `ctx` describes; returns [B, T, H, hd]. `dropout_p` is applied to the attention weights
    (pass 0 in eval); `scale` defaults to 1/sqrt(hd)."""
    if ctx.use_varlen:
        if q.dtype not in (torch.float16, torch.bfloat16):
            # The context chose a varlen kernel and built no mask: SDPA here would silently drop document masking.
            raise RuntimeError(f"varlen attention ({ctx.varlen}) chosen but attention runs in {q.dtype}; "
                               "it needs fp16/bf16")
        if ctx.varlen == TORCH_VARLEN:
            if dropout_p:
                raise RuntimeError(f"torch's varlen_attn has no dropout but attention dropout is {dropout_p}; "
                                   "build the context with document_context(..., dropout_p=...)")
            return _torch_varlen(q, k, v, ctx, scale)
        return _flash_varlen(q, k, v, ctx, dropout_p, scale)
    return _sdpa(q, k, v, ctx, dropout_p, scale)


def _torch_varlen(q, k, v, ctx: AttentionContext, scale: float | None) -> torch.Tensor:
    b, t, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    keywords = _keywords(varlen_attn)
    kwargs = {}
    # Causal: window_size=(-1, 0) from 2.10 on, is_causal=True in 2.9.
    if "window_size" in keywords:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if "scale" in keywords:
        kwargs["scale"] = scale
    elif scale is not None:
        q = q * (scale * head_dim ** 0.5)  # the kernel's own 1/sqrt(hd) then makes it `scale`
    if n_kv_heads != n_heads:
        if "enable_gqa" in keywords:
            # Maps query head h to KV head h // (H / H_kv), as flash-attn and SDPA's enable_gqa do.
            kwargs["enable_gqa"] = True
        else:  # before 2.12 the heads must match: the same mapping, spelled out
            k = k.repeat_interleave(n_heads // n_kv_heads, dim=2)
            v = v.repeat_interleave(n_heads // n_kv_heads, dim=2)
            n_kv_heads = n_heads
    # [B, T, H, hd] -> [B*T, H, hd]: the flattened batch is one long sequence cut at cu_seqlens.
    out = varlen_attn(
        q.reshape(b * t, n_heads, head_dim),
        k.reshape(b * t, n_kv_heads, head_dim),
        v.reshape(b * t, n_kv_heads, head_dim),
        ctx.cu_seqlens, ctx.cu_seqlens, ctx.max_seqlen, ctx.max_seqlen, **kwargs,
    )
    return out.view(b, t, n_heads, head_dim)


def _flash_varlen(q, k, v, ctx: AttentionContext, dropout_p: float, scale: float | None) -> torch.Tensor:
    b, t, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    # [B, T, H, hd] -> [B*T, H, hd]: the flattened batch is one long sequence cut at cu_seqlens.
    out = flash_attn_varlen_func(
        q.reshape(b * t, n_heads, head_dim),
        k.reshape(b * t, n_kv_heads, head_dim),
        v.reshape(b * t, n_kv_heads, head_dim),
        cu_seqlens_q=ctx.cu_seqlens, cu_seqlens_k=ctx.cu_seqlens,
        max_seqlen_q=ctx.max_seqlen, max_seqlen_k=ctx.max_seqlen,
        dropout_p=dropout_p, softmax_scale=scale, causal=True,  # scale None = 1/sqrt(head_dim)
    )
    return out.view(b, t, n_heads, head_dim)


def _sdpa(q, k, v, ctx: AttentionContext, dropout_p: float, scale: float | None) -> torch.Tensor:
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
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale,
                                             enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                             enable_gqa=gqa)
    return out.transpose(1, 2)  # [B, T, H, hd]


def varlen_backend(x: torch.Tensor, dropout_p: float = 0.0) -> str | None:
    """The variable-length kernel document-masked attention on these activations goes through, or None for masked
    SDPA. Both kernels need x on CUDA with the projections running in fp16/bf16 (their only dtypes). torch's
    varlen_attn is preferred when it imports, the GPU is compute capability 8.0+ (its flash kernel's floor) and
    there is no attention dropout (it has none); flash-attn's varlen kernel is the fallback when installed."""
    if not _half_on_cuda(x):
        return None
    sm80 = _sm80_or_newer(x.device)
    if TORCH_VARLEN_AVAILABLE and not dropout_p and sm80:
        say_once(log, logging.INFO, "document-masked attention: torch.nn.attention.varlen.varlen_attn")
        return TORCH_VARLEN
    if FLASH_ATTN_AVAILABLE:
        say_once(log, logging.INFO, "document-masked attention: flash-attn's flash_attn_varlen_func")
        return FLASH_ATTN
    if not TORCH_VARLEN_AVAILABLE:
        why = (f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (PyTorch 2.9+); upgrade "
               "torch or install flash-attn (pip install -e '.[flash]')")
    elif not sm80:
        why = ("torch's varlen_attn needs a GPU of compute capability 8.0+ (Ampere or newer); install flash-attn "
               "(pip install -e '.[flash]')")
    else:
        why = (f"attention dropout is {dropout_p} and torch's varlen_attn has none; set the model's attention "
               "dropout to 0 or install flash-attn (pip install -e '.[flash]')")
    # The fallback is correct, only slower and O(T^2) in memory: say so, with the fix, and go on.
    say_once(log, logging.WARNING, "document-masked attention on CUDA falls back to SDPA with a [B, 1, T, T] mask "
              f"(memory grows with T^2): {why}")
    return None


def _half_on_cuda(x: torch.Tensor) -> bool:
    return x.is_cuda and _compute_dtype(x) in (torch.float16, torch.bfloat16)


def _sm80_or_newer(device: torch.device) -> bool:
    return cuda_capability(device) >= (8, 0)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the projections will produce: autocast's when it is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
