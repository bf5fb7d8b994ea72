"""Building blocks of the PolychromaticLM backbone: RMSNorm, rotary embeddings and the chunked LM loss.

Everything here is dtype-careful in the same way: statistics (RMSNorm variance, RoPE angles, softmax of the
loss) are computed in fp32 and the result is cast back to the activation dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (no bias, no mean subtraction)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (h * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


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


def _chunk_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Logits in the model (or autocast) dtype, upcast for the softmax: only this chunk's [n, V] ever exists.
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_tokens: int) -> torch.Tensor:
    """Mean cross-entropy of softmax(hidden @ weight.T) against targets, `chunk_tokens` rows at a time.

    hidden [N, d] (already final-normed), weight [V, d] (the output head), targets [N] with IGNORE_INDEX
    for positions that carry no loss. Each chunk runs under a non-reentrant checkpoint, so neither the forward
    nor the backward ever holds more than one chunk's logits: autograd keeps only the chunk's inputs and its
    scalar loss, and the backward recomputes that chunk's logits when it reaches it.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    n = hidden.shape[0]
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_tokens):
        h = hidden[start:start + chunk_tokens]
        t = targets[start:start + chunk_tokens]
        if needs_grad:
            part = checkpoint(_chunk_ce_sum, h, weight, t, use_reentrant=False)
        else:
            part = _chunk_ce_sum(h, weight, t)
        total = total + part
    n_valid = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return total / n_valid
