"""build_data: the trainer's one way in to data/, which builds a run's DataBundle in memory or from token shards."""

from __future__ import annotations

from .bundle import DataBundle, mix_schedule
from .chat.build import build_chat_data
from .config import DataConfig
from .memory import build_memory_data
from .shards.load import build_shard_data


def build_data(cfg: DataConfig, seed: int) -> DataBundle:
    """The tokenizer, training and per-domain eval blocks, and the data.mix schedule: read, tokenized and packed
    in memory (data.format=memory, cached in data.cache_dir), or opened from token shards (data.format=shards).
    `seed` chooses the in-memory train/eval split (data.split_seed); shards were split when tokenized.
    data.chat=true: conversations with labels on the assistant's turns (data/chat/build.py), in memory."""
    mix = mix_schedule(cfg)
    if cfg.chat:
        return build_chat_data(cfg, seed, mix)
    if cfg.format == "shards":
        return build_shard_data(cfg, mix)
    return build_memory_data(cfg, seed, mix)
