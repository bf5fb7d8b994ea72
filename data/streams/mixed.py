"""Endless, deterministic, resumable micro-batches mixed from several domains by a weight schedule."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from trainer.base.errors import UserError
from trainer.base.metrics import data_fraction, data_target

from .schedule import MixSchedule


class MixedStream:
    """Rank-sharded micro-batches whose domain proportions follow `schedule` over training.

    Micro-step m draws one global window of batch_size * world_size samples, weighted by the schedule at
    optimizer step m // micro_steps_per_update. Samples are allotted by accumulated credit rather than
    drawn at random, so each domain's realised count stays within about one sample of its scheduled share
    at every step, not just on average. The window is then shuffled (so every rank's slice mixes domains)
    and rank r reads its own slice of it. Each domain walks its blocks in a per-epoch permutation with its
    own cursor. The state is a few ints and floats, so resuming needs no data, survives a
    `weights_only=True` checkpoint, and may change batch_size or world_size (cursors count blocks).
    """

    def __init__(self, sources: dict[str, Any], schedule: MixSchedule, batch_size: int, seed: int,
                 micro_steps_per_update: int, max_steps: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if batch_size < 1 or micro_steps_per_update < 1 or max_steps < 1:
            raise ValueError(f"batch_size={batch_size}, micro_steps_per_update={micro_steps_per_update} and "
                             f"max_steps={max_steps} must all be >= 1")
        self.domains = sorted(sources)
        if self.domains != schedule.domains:
            raise UserError(f"data.mix weighs domains {schedule.domains} but the training data has {self.domains}; "
                            "give data.mix a weight for exactly the domains in data.domains")
        for d in self.domains:
            if len(sources[d]) == 0:
                raise UserError(f"data.domains.{d} has 0 training blocks; raise data.size_mb "
                                "(or lower data.block_size) or drop the domain")
        self.sources = sources
        self.schedule = schedule
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.micro_steps_per_update = int(micro_steps_per_update)
        self.max_steps = int(max_steps)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.micro_step = 0
        self.credit = dict.fromkeys(self.domains, 0.0)
        self.cursor = dict.fromkeys(self.domains, 0)
        self._perm: dict[str, tuple[int, np.ndarray]] = {}  # domain -> (epoch, permutation) last used
        self._reset_metrics()

    def _reset_metrics(self) -> None:
        self._counts = dict.fromkeys(self.domains, 0)
        self._target: dict[str, float] = {}

    def _blocks(self, d: str, k: np.ndarray) -> np.ndarray:
        """Block indices of domain d's k-th blocks (k ascending, so each epoch's permutation is built once)."""
        n = len(self.sources[d])
        out = np.empty(len(k), dtype=np.int64)
        epochs = k // n
        for e in np.unique(epochs):
            cached = self._perm.get(d)
            if cached is None or cached[0] != e:
                # crc32, not hash(): str hashes are salted per process, and every rank must agree.
                rng = np.random.default_rng((self.seed % 2**64, zlib.crc32(d.encode()), int(e)))
                cached = self._perm[d] = (int(e), rng.permutation(n))
            sel = epochs == e
            out[sel] = cached[1][k[sel] % n]
        return out

    def _draw(self) -> tuple[np.ndarray, np.ndarray]:
        """The next global window as (domain index, per-domain block counter k) per position; advances."""
        window = self.batch_size * self.world_size
        step = self.micro_step // self.micro_steps_per_update
        weights = self.schedule.weights_at(step / self.max_steps)
        credit = [self.credit[d] + weights[d] * window for d in self.domains]
        picks = np.empty(window, dtype=np.int64)
        for j in range(window):
            i = max(range(len(credit)), key=credit.__getitem__)  # max() keeps the first of equals: sorted order
            picks[j] = i
            credit[i] -= 1.0
        # The k-th pick of a domain in this window takes that domain's block counter cursor + k.
        ks = np.empty(window, dtype=np.int64)
        for i, d in enumerate(self.domains):
            mine = picks == i
            count = int(mine.sum())
            ks[mine] = self.cursor[d] + np.arange(count)
            self.cursor[d] += count
            self._counts[d] += count
            self.credit[d] = credit[i]
        order = np.random.default_rng((self.seed % 2**64, self.micro_step, 1)).permutation(window)
        self._target = weights
        self.micro_step += 1
        return picks[order], ks[order]

    def next_batch(self) -> dict[str, torch.Tensor]:
        picks, ks = self._draw()
        lo = self.rank * self.batch_size
        picks, ks = picks[lo:lo + self.batch_size], ks[lo:lo + self.batch_size]
        parts: list[dict[str, torch.Tensor]] = []
        positions: list[np.ndarray] = []
        for i, d in enumerate(self.domains):
            pos = np.flatnonzero(picks == i)
            if len(pos):
                pos = pos[np.argsort(ks[pos], kind="stable")]
                parts.append(self.sources[d].batch(self._blocks(d, ks[pos])))
                positions.append(pos)
        # Parts come grouped by domain; the inverse of that order puts every sample back at its window slot.
        inverse = torch.from_numpy(np.argsort(np.concatenate(positions), kind="stable"))
        return {key: torch.cat([p[key] for p in parts])[inverse] for key in parts[0]}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def pop_metrics(self) -> dict[str, float]:
        """Realised fraction per domain over the global windows since the last call, and the latest target."""
        total = sum(self._counts.values())
        if total == 0:
            return {}
        out: dict[str, float] = {}
        for d in self.domains:
            out[data_fraction(d)] = self._counts[d] / total
            out[data_target(d)] = float(self._target[d])
        self._reset_metrics()
        return out

    def state_dict(self) -> dict:
        return {"kind": "mixed", "micro_step": self.micro_step, "credit": dict(self.credit),
                "cursor": dict(self.cursor), "seed": self.seed,
                "num_blocks": {d: len(self.sources[d]) for d in self.domains}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "mixed":
            raise UserError("the checkpoint was written with another data stream (no data.mix schedule); "
                            "resume with the same data.* settings as the checkpoint")
        saved = {str(d): int(n) for d, n in state["num_blocks"].items()}
        for d in sorted(set(saved) | set(self.domains)):
            if d not in saved:
                raise UserError(f"this run has domain {d!r} but the checkpoint's data stream had only "
                                f"{sorted(saved)}; resume with the same data.* settings as the checkpoint")
            if d not in self.sources:
                raise UserError(f"the checkpoint's data stream had domain {d!r}, which this run lacks "
                                f"({self.domains}); resume with the same data.* settings as the checkpoint")
            if saved[d] != len(self.sources[d]):
                raise UserError(f"the checkpoint's data stream had {saved[d]} training blocks of {d!r} but this "
                                f"run has {len(self.sources[d])}; resume with the same data.* settings")
        self.seed = int(state["seed"])
        self.micro_step = int(state["micro_step"])
        self.credit = {d: float(state["credit"][d]) for d in self.domains}
        self.cursor = {d: int(state["cursor"][d]) for d in self.domains}
        self._perm = {}
        self._reset_metrics()
