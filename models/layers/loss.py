"""The LM loss in chunks: cross-entropy over [tokens, vocab] logits that never exist all at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer.base.batch import IGNORE_INDEX


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
