"""Eval loss and perplexity per domain, token-weighted, sharded across processes and summed."""

from __future__ import annotations

import math

import numpy as np
import torch


@torch.no_grad()
def evaluate(engine, eval_sets: dict, batch_size: int) -> dict[str, float]:
    """Returns eval/<domain>/loss, eval/<domain>/ppl, and the aggregate eval/loss, eval/ppl."""
    model = engine.model
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    total_loss = total_tokens = 0.0
    for domain, blocks in eval_sets.items():
        mine = np.arange(engine.rank, len(blocks), engine.world_size)
        sums = torch.zeros(2, dtype=torch.float64)
        for start in range(0, len(mine), batch_size):
            idx = mine[start:start + batch_size]
            batch = {
                "input_ids": torch.from_numpy(blocks.input_ids[idx].astype(np.int64)).to(engine.device),
                "document_ids": torch.from_numpy(blocks.document_ids[idx].astype(np.int64)).to(engine.device),
            }
            out = engine.eval_forward(batch)
            predicted = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)
            sums += torch.tensor([float(out.lm_loss) * predicted, predicted], dtype=torch.float64)
        sums = engine.all_reduce_sum(sums.to(engine.device)).cpu()
        loss_sum, tokens = float(sums[0]), float(sums[1])
        if tokens == 0:
            continue
        loss = loss_sum / tokens
        metrics[f"eval/{domain}/loss"] = loss
        metrics[f"eval/{domain}/ppl"] = math.exp(min(loss, 50.0))
        total_loss += loss_sum
        total_tokens += tokens
    if total_tokens:
        metrics["eval/loss"] = total_loss / total_tokens
        metrics["eval/ppl"] = math.exp(min(metrics["eval/loss"], 50.0))
    model.train(was_training)
    return metrics
