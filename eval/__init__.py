"""Evaluation: perplexity per domain (more analyses arrive with the model families)."""
