"""Data for the trainer: per-domain corpora, tokenizers, packed blocks and a resumable batch stream.

`build_data(cfg.data, seed=cfg.data.split_seed)` returns everything the training loop needs; its
`train_stream(...)` (seeded by run.seed) is a BlockStream (shuffled blocks) or a MixedStream (domain weights
on a schedule), both rank-sharded and resumable from the position saved with each checkpoint. Token shards:
`tokenize_shards` writes them, `shards` reads them.
"""

from .mixed_stream import MixedStream
from .mixing import MixSchedule
from .packing import PackedBlocks
from .pipeline import DataBundle, build_data
from .stream import BlockStream
from .tokenizer import TextTokenizer

__all__ = ["BlockStream", "DataBundle", "MixSchedule", "MixedStream", "PackedBlocks", "TextTokenizer", "build_data"]
