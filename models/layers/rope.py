"""Rotary position embeddings (rotate-half layout, as Llama and Qwen), with fp32 angles."""

from __future__ import annotations

import torch


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device: torch.device | str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables [seq_len, head_dim] for positions 0..seq_len-1 (rotate-half layout, as Llama/Qwen).

    Computed per forward instead of kept in a buffer: a buffer would be cast to bf16 by `model.to(bf16)`
    (losing the precision RoPE needs at position ~4096) and would hold garbage after meta-device
    construction; the table is only seq_len x head_dim, so recomputing it is negligible.
    """
    return rope_cos_sin_at(torch.arange(seq_len, device=device), head_dim, theta)


def rope_cos_sin_at(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables [*positions.shape, head_dim] for the given positions: [T] for one layout shared by
    the batch, [B, T] where each row has its own (a left-padded row starts at 0 after its padding; a decoding
    step continues where its row's cache ends)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
                                / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # [..., hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)                     # [..., hd]
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, hd] by the fp32 tables cos/sin, [T, hd] or per row [B, T, hd]; the result keeps
    x's dtype."""
    if cos.dim() == 3:
        c, s = cos[:, :, None, :], sin[:, :, None, :]
    else:
        c, s = cos[: x.shape[1], None, :], sin[: x.shape[1], None, :]
    xf = x.float()
    return (xf * c + _rotate_half(xf) * s).to(x.dtype)
