"""Data for the trainer: per-domain corpora, tokenizers, packed blocks and a resumable batch stream.

Importing the package imports nothing else (data.config is read by config validation, which must not
import torch); import the part you need, starting from `data.pipeline.build_data`.
"""
