"""Token streams -> fixed-size blocks, remembering where each packed document starts."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from trainer.base.batch import IGNORE_INDEX


@dataclass
class PackedBlocks:
    input_ids: np.ndarray  # [N, T] int32
    document_ids: np.ndarray  # [N, T] int32: 0 for the block's first document, +1 at each new document
    domain_ids: np.ndarray  # [N] int16 index into `domains`
    domains: list[str]
    # [N, T] int32, aligned with input_ids (the model shifts), IGNORE_INDEX where no loss (chat: all but the
    # assistant's tokens, and padding); None: the inputs are the labels (pretraining).
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.input_ids)
        shape = self.input_ids.shape
        if self.input_ids.ndim != 2 or self.document_ids.shape != shape or self.domain_ids.shape != (n,) \
                or (self.labels is not None and self.labels.shape != shape):
            raise ValueError(f"inconsistent shapes: input_ids {self.input_ids.shape}, "
                             f"document_ids {self.document_ids.shape}, domain_ids {self.domain_ids.shape}, "
                             f"labels {None if self.labels is None else self.labels.shape}")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def block_size(self) -> int:
        return self.input_ids.shape[1]

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """The blocks at `idx` as the int64 tensors a model's forward takes (training and eval alike), with
        "labels" when the blocks have them (trainer/base/batch.py)."""
        out = {
            "input_ids": torch.from_numpy(self.input_ids[idx].astype(np.int64)),
            "document_ids": torch.from_numpy(self.document_ids[idx].astype(np.int64)),
            "domain_ids": torch.from_numpy(self.domain_ids[idx].astype(np.int64)),
        }
        if self.labels is not None:
            out["labels"] = torch.from_numpy(self.labels[idx].astype(np.int64))
        return out

    @staticmethod
    def concat(parts: list[PackedBlocks]) -> PackedBlocks:
        # Labels when any part has them; a part without stands for labels = its inputs (every token scored).
        labels = None
        if any(p.labels is not None for p in parts):
            labels = np.concatenate([p.labels if p.labels is not None else p.input_ids.astype(np.int32)
                                     for p in parts])
        return PackedBlocks(
            input_ids=np.concatenate([p.input_ids for p in parts]),
            document_ids=np.concatenate([p.document_ids for p in parts]),
            domain_ids=np.concatenate([p.domain_ids for p in parts]),
            domains=list(parts[0].domains),
            labels=labels,
        )

    def head(self, n: int) -> PackedBlocks:
        """The first `n` blocks."""
        return PackedBlocks(self.input_ids[:n], self.document_ids[:n], self.domain_ids[:n], list(self.domains),
                            None if self.labels is None else self.labels[:n])


def document_index(doc_lengths: np.ndarray, n_tokens: int) -> np.ndarray:
    """Per token, the index of the document it belongs to (first `n_tokens` tokens)."""
    idx = np.repeat(np.arange(len(doc_lengths), dtype=np.int32), doc_lengths.astype(np.int64))
    return idx[:n_tokens]


def pack(tokens: np.ndarray, doc_lengths: np.ndarray, block_size: int, domain: str, domains: list[str],
         max_blocks: int | None = None) -> PackedBlocks:
    """Cut `tokens` (documents back to back, each ending in EOS) into [N, block_size], ragged tail dropped.

    A document running over a block edge counts as document 0 of the next block, so masks built from
    document_ids never let a block attend to the part of a document it cannot see anyway.
    """
    n = len(tokens) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    used = n * block_size
    ids = np.ascontiguousarray(tokens[:used], dtype=np.int32).reshape(n, block_size)
    doc = document_index(doc_lengths, used).reshape(n, block_size)
    doc = (doc - doc[:, :1]).astype(np.int32)
    dom = np.full(n, domains.index(domain), dtype=np.int16)
    return PackedBlocks(input_ids=ids, document_ids=doc, domain_ids=dom, domains=list(domains))


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each summing to <= capacity (every length must fit): longest item first, each into
    the fullest bin it fits in (ties: the earliest bin). Deterministic for the same lengths."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, bin index) of bins with room
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


def pack_conversations(conversations: list[tuple[np.ndarray, np.ndarray]], block_size: int, pad_id: int,
                       domain: str, domains: list[str], max_blocks: int | None = None) -> tuple[PackedBlocks, dict]:
    """Conversations (ids, assistant mask) packed whole into blocks (best fit decreasing), with labels.

    A conversation longer than block_size is cut to it (counted: truncated); one with no assistant token left is
    dropped (dropped_no_assistant). Each conversation gets its own document id within its block, and so does the
    padding after the last one (EOS ids, label IGNORE_INDEX), so nothing attends across conversations.
    `max_blocks` keeps the first blocks only. Returns the blocks and their counts.
    """
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    truncated = dropped = 0
    for ids, mask in conversations:
        if len(ids) > block_size:
            truncated += 1
            ids, mask = ids[:block_size], mask[:block_size]
        if not mask.any():
            dropped += 1
            continue
        kept.append((ids, mask))
    bins = best_fit_decreasing([len(ids) for ids, _ in kept], block_size)
    if max_blocks is not None:
        bins = bins[:max_blocks]
    n = len(bins)
    input_ids = np.full((n, block_size), pad_id, dtype=np.int32)
    labels = np.full((n, block_size), IGNORE_INDEX, dtype=np.int32)
    document_ids = np.zeros((n, block_size), dtype=np.int32)
    tokens = scored = 0
    for b, members in enumerate(bins):
        pos = 0
        for doc, i in enumerate(members):
            ids, mask = kept[i]
            end = pos + len(ids)
            input_ids[b, pos:end] = ids
            labels[b, pos:end] = np.where(mask, ids, IGNORE_INDEX)
            document_ids[b, pos:end] = doc
            pos = end
            scored += int(mask.sum())
        document_ids[b, pos:] = len(members)  # the padding: a document of its own
        tokens += pos
    blocks = PackedBlocks(input_ids=input_ids, document_ids=document_ids,
                          domain_ids=np.full(n, domains.index(domain), dtype=np.int16), domains=list(domains),
                          labels=labels)
    stats = {"conversations": len(conversations), "truncated": truncated, "dropped_no_assistant": dropped,
             "packed": sum(len(m) for m in bins), "tokens": tokens, "assistant_tokens": scored, "blocks": n,
             "padding_tokens": n * block_size - tokens,
             "packing_efficiency": round(tokens / (n * block_size), 4) if n else 0.0}
    return blocks, stats
