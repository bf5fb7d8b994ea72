"""Data for the trainer: per-domain corpora, tokenizers, packed blocks and a resumable batch stream.

Its parts: config (the data.* schema), sources/ (documents from the embedded corpus, local files or the hub),
tokenizer and cache, packing, streams/ (shuffled and mixed training streams), shards/ (token shards on disk,
the task=tokenize writer, the loader), memory (the in-memory corpus), bundle (what a builder returns) and build
(build_data, which picks memory or shards).

Importing the package imports nothing else (data.config is read by config validation, which must not
import torch); import the part you need, starting from `data.build.build_data`.
"""
