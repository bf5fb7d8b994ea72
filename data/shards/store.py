"""Token shards on disk, and blocks read from them through memory maps.

One directory per domain:
  train-00000.bin        uint32 tokens, documents back to back, each followed by EOS
  train-00000.docs.npy   uint64 start offset of every document in that shard
  eval-00000.bin / .docs.npy   held-out documents (read before any training shard, never trained on)
  index.json             settings (tokenizer name and fingerprint, source, sizes) and the finished shards

A shard counts only once index.json lists it, and both files are renamed into place before the index
is rewritten, so an interrupted writer never leaves a partial shard under a name a reader trusts.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from trainer.base.atomic_files import atomic_path
from trainer.base.errors import UserError

from ..cache import load_json, save_json
from ..packing import PackedBlocks, pack

FORMAT_VERSION = 1
INDEX = "index.json"
TOKEN_DTYPE = np.uint32


def shard_files(directory: str, name: str) -> tuple[str, str]:
    return os.path.join(directory, f"{name}.bin"), os.path.join(directory, f"{name}.docs.npy")


def write_shard(directory: str, name: str, tokens: np.ndarray, doc_lengths: np.ndarray) -> dict:
    """Write one shard (tokens, per-document lengths incl. EOS) atomically; return its index entry."""
    tokens = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)
    if int(doc_lengths.sum()) != len(tokens):
        raise ValueError(f"document lengths sum to {int(doc_lengths.sum())}, but the shard has {len(tokens)} tokens")
    starts = np.zeros(len(doc_lengths), dtype=np.uint64)
    np.cumsum(doc_lengths[:-1], out=starts[1:])
    bin_path, docs_path = shard_files(directory, name)
    with atomic_path(docs_path) as tmp, open(tmp, "wb") as f:
        np.save(f, starts, allow_pickle=False)
    with atomic_path(bin_path) as tmp:
        tokens.tofile(tmp)
    return {"name": name, "tokens": len(tokens), "documents": len(doc_lengths),
            "sha256": hashlib.sha256(memoryview(tokens).cast("B")).hexdigest()}


def read_index(directory: str) -> dict | None:
    path = os.path.join(directory, INDEX)
    return load_json(path) if os.path.isfile(path) else None


def write_index(directory: str, index: dict) -> None:
    save_json(os.path.join(directory, INDEX), index)


@dataclass
class Shard:
    tokens: np.ndarray  # memory-mapped uint32
    doc_starts: np.ndarray  # int64 offsets within this shard


def open_shard(directory: str, entry: dict) -> Shard:
    bin_path, docs_path = shard_files(directory, entry["name"])
    expected = int(entry["tokens"]) * np.dtype(TOKEN_DTYPE).itemsize
    if not os.path.isfile(bin_path) or os.path.getsize(bin_path) != expected:
        raise UserError(f"{bin_path} is missing or not {expected} bytes as {INDEX} says; the shard directory is "
                        "damaged: delete it and tokenize again")
    tokens = np.memmap(bin_path, dtype=TOKEN_DTYPE, mode="r") if expected else np.empty(0, TOKEN_DTYPE)
    return Shard(tokens=tokens, doc_starts=np.load(docs_path, allow_pickle=False).astype(np.int64))


class ShardSet:
    """A finished domain directory: its index, the training shards as one token sequence, and the eval shard."""

    def __init__(self, directory: str, key: str, tokenize_hint: str):
        index = read_index(directory)
        if index is None:
            raise UserError(f"{key}: no token shards at {directory}; tokenize first with: {tokenize_hint}")
        if index.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{directory} holds shard format {index.get('format_version')}, this trainer reads "
                            f"{FORMAT_VERSION}; tokenize again into a new directory")
        if not index.get("complete"):
            raise UserError(f"{key}: tokenization into {directory} did not finish ({len(index['train'])} shard(s) "
                            f"so far); re-run the same command to finish it: {tokenize_hint}")
        self.directory, self.index = directory, index
        self.shards = [open_shard(directory, e) for e in index["train"]]
        sizes = np.array([len(s.tokens) for s in self.shards], dtype=np.int64)
        self.shard_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # global start of each
        self.num_tokens = int(self.shard_offsets[-1])
        # Every document start, as a global offset into the training token sequence (a finished index
        # always lists at least one training shard).
        self.doc_starts = np.concatenate([s.doc_starts + off for s, off in zip(self.shards, self.shard_offsets,
                                                                                  strict=False)])

    @property
    def tokenizer(self) -> dict:
        return self.index["settings"]["tokenizer"]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the training sequence, across shard edges when needed."""
        out = np.empty(length, dtype=np.int64)
        filled, pos = 0, start
        shard = int(np.searchsorted(self.shard_offsets, pos, side="right")) - 1
        while filled < length:
            local = pos - int(self.shard_offsets[shard])
            piece = self.shards[shard].tokens[local:local + length - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            pos += len(piece)
            shard += 1
        return out

    def eval_blocks(self, block_size: int, max_blocks: int, domain: str, domains: list[str]) -> PackedBlocks:
        entry = self.index.get("eval")
        if not entry or not entry["tokens"]:
            return pack(np.zeros(0, np.int32), np.zeros(0, np.int64), block_size, domain, domains)
        shard = open_shard(self.directory, entry)
        used = min(len(shard.tokens), max_blocks * block_size)
        lengths = np.diff(np.append(shard.doc_starts, len(shard.tokens)))
        return pack(np.asarray(shard.tokens[:used], dtype=np.int32), lengths, block_size, domain, domains,
                    max_blocks=max_blocks)


class ShardBlocks:
    """Blocks of `block_size` tokens over a ShardSet's training sequence, for MixedStream.

    The model shifts labels itself, so a block of block_size tokens trains block_size - 1 predictions.
    Consecutive blocks share one token (stride block_size - 1): every token after the first is a label
    exactly once per epoch, as with the usual seq_len + 1 windows.
    """

    def __init__(self, shards: ShardSet, block_size: int, domain: str, domains: list[str]):
        self.shards, self.block_size = shards, int(block_size)
        self.stride = self.block_size - 1
        self.domain_id = domains.index(domain)
        n = shards.num_tokens
        self._len = 0 if n < self.block_size else (n - self.block_size) // self.stride + 1

    def __len__(self) -> int:
        return self._len

    def block(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of block i and their document ids (0 for the block's first document, +1 at each new one)."""
        if not 0 <= i < self._len:
            raise IndexError(f"block {i} outside 0..{self._len - 1}")
        start = i * self.stride
        tokens = self.shards.read(start, self.block_size)
        positions = np.arange(start, start + self.block_size)
        doc = np.searchsorted(self.shards.doc_starts, positions, side="right") - 1
        return tokens, doc - doc[0]

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        ids = np.empty((len(idx), self.block_size), dtype=np.int64)
        docs = np.empty_like(ids)
        for row, i in enumerate(idx):
            ids[row], docs[row] = self.block(int(i))
        return {"input_ids": torch.from_numpy(ids), "document_ids": torch.from_numpy(docs),
                "domain_ids": torch.full((len(idx),), self.domain_id, dtype=torch.int64)}
