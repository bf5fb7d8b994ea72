"""Token streams -> fixed-size blocks, remembering where each packed document starts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PackedBlocks:
    input_ids: np.ndarray  # [N, T] int32; labels are the inputs (the model shifts)
    document_ids: np.ndarray  # [N, T] int32: 0 for the block's first document, +1 at each new document
    domain_ids: np.ndarray  # [N] int16 index into `domains`
    domains: list[str]

    def __post_init__(self) -> None:
        n = len(self.input_ids)
        if self.input_ids.ndim != 2 or self.document_ids.shape != self.input_ids.shape or self.domain_ids.shape != (n,):
            raise ValueError(f"inconsistent shapes: input_ids {self.input_ids.shape}, "
                             f"document_ids {self.document_ids.shape}, domain_ids {self.domain_ids.shape}")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def block_size(self) -> int:
        return self.input_ids.shape[1]

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """The blocks at `idx` as the int64 tensors a model's forward takes (training and eval alike)."""
        return {
            "input_ids": torch.from_numpy(self.input_ids[idx].astype(np.int64)),
            "document_ids": torch.from_numpy(self.document_ids[idx].astype(np.int64)),
            "domain_ids": torch.from_numpy(self.domain_ids[idx].astype(np.int64)),
        }

    @staticmethod
    def concat(parts: list[PackedBlocks]) -> PackedBlocks:
        return PackedBlocks(
            input_ids=np.concatenate([p.input_ids for p in parts]),
            document_ids=np.concatenate([p.document_ids for p in parts]),
            domain_ids=np.concatenate([p.domain_ids for p in parts]),
            domains=list(parts[0].domains),
        )


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
