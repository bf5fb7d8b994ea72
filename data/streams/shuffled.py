"""Endless, deterministic, resumable micro-batches over packed blocks, sharded across ranks."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from trainer.base.errors import UserError
from trainer.base.metrics import data_fraction

from ..packing import PackedBlocks


class BlockStream:
    """Endless, deterministic, resumable micro-batch stream over PackedBlocks, sharded by rank.

    Epoch e visits the blocks in the order `default_rng((seed, e)).permutation(n)`. All ranks share one
    cursor that moves by batch_size * world_size per micro-step; rank r reads its own slice of that
    window, so ranks never overlap and together consume exactly what one big batch would. A window that
    would run past the end starts the next epoch instead (the few leftover blocks wait for a later epoch).
    The state is three ints, so resuming needs no data and survives a `weights_only=True` checkpoint.
    """

    def __init__(self, blocks: PackedBlocks, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.blocks = blocks
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.epoch = 0
        self.cursor = 0
        self._perm: np.ndarray | None = None
        self._counts = np.zeros(len(blocks.domains), dtype=np.int64)  # domain samples since pop_metrics
        self._check_size()

    def _check_size(self) -> None:
        need = self.batch_size * self.world_size
        if len(self.blocks) < need:
            raise UserError(f"the training set has {len(self.blocks)} blocks but one micro-step needs "
                            f"train.batch_size={self.batch_size} x {self.world_size} rank(s) = {need}; "
                            "raise data.size_mb (or lower data.block_size) or lower train.batch_size")

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            # SeedSequence rejects negative ints; fold them into uint64 so any run.seed works.
            rng = np.random.default_rng((self.seed % 2**64, self.epoch))
            self._perm = rng.permutation(len(self.blocks))
        return self._perm

    def next_indices(self) -> np.ndarray:
        """This rank's block indices for the next micro-step (advances the stream)."""
        window = self.batch_size * self.world_size
        if self.cursor + window > len(self.blocks):
            self.epoch += 1
            self.cursor = 0
            self._perm = None
        perm = self._permutation()
        whole = perm[self.cursor:self.cursor + window]  # every rank's blocks: the logged mix is the global one
        self._counts += np.bincount(self.blocks.domain_ids[whole], minlength=len(self._counts))
        start = self.cursor + self.rank * self.batch_size
        idx = perm[start:start + self.batch_size]
        self.cursor += window
        return idx

    def pop_metrics(self) -> dict[str, float]:
        """data/<domain>/fraction: each domain's share of the samples drawn since the last call."""
        total = int(self._counts.sum())
        if not total:
            return {}
        out = {data_fraction(d): float(c) / total for d, c in zip(self.blocks.domains, self._counts, strict=True)}
        self._counts[:] = 0
        return out

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.blocks.batch(self.next_indices())

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"kind": "blocks", "epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "num_blocks": len(self.blocks), "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind", "blocks") != "blocks":
            raise UserError(f"the checkpoint was written with another data stream ({state.get('kind')!r}, a domain "
                            "mix); resume with the same data.* settings (data.mix, data.format) as the checkpoint")
        if int(state["num_blocks"]) != len(self.blocks):
            raise UserError(f"the checkpoint's data stream had {state['num_blocks']} training blocks but this run "
                            f"has {len(self.blocks)}; resume with the same data.* settings as the checkpoint")
        # The cursor counts blocks, so a resume with another batch size or world size stays valid.
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._perm = None
