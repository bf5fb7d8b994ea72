"""DataBundle: what a data builder hands the trainer (tokenizer, training and eval blocks, summary, mix), and the
training stream it makes; both builders (in memory and from shards) return one, so neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import DataConfig
from .packing import PackedBlocks
from .streams.mixed import MixedStream
from .streams.schedule import MixSchedule
from .streams.shuffled import BlockStream
from .tokenizer import TextTokenizer


@dataclass
class DataBundle:
    tokenizer: TextTokenizer
    train: PackedBlocks | None  # memory format: every domain's training blocks together (BlockStream)
    eval: dict[str, PackedBlocks]  # per domain, at most data.max_eval_blocks blocks each
    summary: dict  # JSON-able description of what was built and where it came from
    # Per domain, anything with __len__ and batch(idx): PackedBlocks or ShardBlocks (MixedStream)
    train_by_domain: dict[str, Any] = field(default_factory=dict)
    mix: MixSchedule | None = None  # set: MixedStream with these weights; None: BlockStream over `train`

    def train_blocks(self) -> int:
        """How many training blocks one pass over the data (an epoch) holds."""
        if self.train_by_domain:
            return sum(len(blocks) for blocks in self.train_by_domain.values())
        return len(self.train) if self.train is not None else 0

    def train_stream(self, batch_size: int, seed: int, rank: int, world_size: int, micro_steps_per_update: int,
                     max_steps: int) -> BlockStream | MixedStream:
        """The resumable training stream: a scheduled domain mix when there is one, else shuffled blocks."""
        if self.mix is not None:
            return MixedStream(self.train_by_domain, self.mix, batch_size, seed, micro_steps_per_update, max_steps,
                               rank=rank, world_size=world_size)
        assert self.train is not None
        return BlockStream(self.train, batch_size, seed=seed, rank=rank, world_size=world_size)


def mix_schedule(cfg: DataConfig) -> MixSchedule | None:
    """data.mix as a MixSchedule over the configured domains; None when data.mix is empty."""
    if not cfg.mix:
        return None
    return MixSchedule([(p.at, dict(p.weights)) for p in cfg.mix], sorted(cfg.domains))
