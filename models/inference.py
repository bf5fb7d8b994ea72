"""What eval's tools (the lm-eval adapter, text generation) ask of every family besides training's forward.

    model.context_window                  the most positions one sequence may hold
    model.logits(input_ids, attention_mask, last=None, cache=None) -> (logits [B, last or T, V], cache)
    model.new_cache()                     an empty KV cache, or None where the family cannot keep one

`attention_mask` [B, T_total] is 1 on tokens and 0 on padding. Scoring pads on the right or the left, generation
on the left; either way padding never changes a token's logits: a family gives each row positions that start at
its first token (`token_positions`) and keeps padding out of attention and out of any pooling over the sequence.
`last` keeps only the logits of the last positions (a scorer needs the continuation's, a decoder the final one),
so the [B, T, V] logits of the whole batch need not exist.

Decoding with a cache: the first call passes the (left-padded) prompts and the empty cache, each later call the
new tokens alone with the attention_mask of everything so far, and gets the cache back. Without one (None), a
caller recomputes over the whole sequence each step.
"""

from __future__ import annotations

import torch


def token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Long [B, T]: each token's position counted from its row's first token (padding before it gets 0)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
