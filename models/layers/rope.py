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
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)            # [T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)       # [T, hd]
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, hd] by the fp32 tables cos/sin [T, hd]; the result keeps x's dtype."""
    c = cos[: x.shape[1], None, :]
    s = sin[: x.shape[1], None, :]
    xf = x.float()
    return (xf * c + _rotate_half(xf) * s).to(x.dtype)
