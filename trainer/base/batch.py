"""The batch contract between data/, models/ and the loop: what a training or eval batch holds.

A batch is a dict of int64 tensors, all [B, T] unless noted:
- input_ids: the packed tokens;
- document_ids: 0 for a row's first document, +1 at each new one (attention may be masked by it);
- domain_ids [B]: index into the data's domains (eval per source);
- labels (optional): the tokens to score, aligned with input_ids (the model shifts: position t is scored on
  labels[t + 1]); IGNORE_INDEX where a token carries no loss (an SFT prompt, padding). Absent: every next
  token is scored, as in pretraining.

Standard library only; the helpers below take torch tensors without importing torch.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100  # PyTorch's cross_entropy default ignore_index, and transformers'


def scored_per_row(batch: dict[str, Any]) -> Any:
    """Per row [B], how many next-token targets carry loss: T - 1 without labels."""
    labels = batch.get("labels")
    if labels is None:
        ids = batch["input_ids"]
        return ids.new_full((ids.shape[0],), ids.shape[1] - 1)
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def scored_tokens(batch: dict[str, Any]) -> int:
    """How many next-token targets in the batch carry loss (the weight of its mean loss)."""
    labels = batch.get("labels")
    if labels is None:
        b, t = batch["input_ids"].shape
        return b * (t - 1)
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
