"""Data for the trainer: per-domain corpora, tokenizers, packed blocks and a resumable batch stream.

`build_data(cfg.data, seed)` returns everything the training loop needs; `BlockStream` turns the
training blocks into rank-sharded micro-batches whose position is saved with each checkpoint.
"""

from .packing import PackedBlocks
from .pipeline import DataBundle, build_data
from .stream import BlockStream
from .tokenizer import TextTokenizer

__all__ = ["BlockStream", "DataBundle", "PackedBlocks", "TextTokenizer", "build_data"]
