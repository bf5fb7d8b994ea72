"""Eval during training: loss and perplexity per domain, token-weighted, sharded across processes and summed,
with the model's routing statistics per domain. eval/ holds the tools that score a finished run."""

from __future__ import annotations

import numpy as np
import torch

from trainer.base.batch import scored_tokens
from trainer.base.metrics import DomainEval, EvalMetrics, perplexity


@torch.no_grad()
def evaluate(engine, eval_sets: dict, batch_size: int) -> EvalMetrics:
    """Per domain: loss, perplexity and, for routed models, each routing statistic (e.g. per-expert usage),
    token-weighted; plus the aggregate over domains."""
    model = engine.model
    was_training = model.training
    model.eval()
    result = EvalMetrics()
    total_loss = total_tokens = 0.0
    for domain, blocks in eval_sets.items():
        mine = np.arange(engine.rank, len(blocks), engine.world_size)
        sums = torch.zeros(2, dtype=torch.float64)
        routing: dict[str, torch.Tensor] = {}
        for start in range(0, len(mine), batch_size):
            idx = mine[start:start + batch_size]
            batch = {k: v.to(engine.device) for k, v in blocks.batch(idx).items()}
            out = engine.eval_forward(batch)
            predicted = scored_tokens(batch)  # the batch's mean loss is over these (assistant tokens in SFT)
            sums += torch.tensor([float(out.lm_loss) * predicted, predicted], dtype=torch.float64)
            for key, value in out.routing.items():
                weighted = value.detach().double().cpu().reshape(-1) * predicted
                routing[key] = routing[key] + weighted if key in routing else weighted
        # One reduction per domain. Routing statistics join it only when every process evaluated at
        # least one batch (their shapes are only known after a forward).
        keys = sorted(routing)
        payload = torch.cat([sums, *(routing[k] for k in keys)]) if len(blocks) >= engine.world_size else sums
        payload = engine.all_reduce_sum(payload.to(engine.device)).cpu()
        loss_sum, tokens = float(payload[0]), float(payload[1])
        if tokens == 0:
            continue
        loss = loss_sum / tokens
        stats: dict = {}
        offset = 2
        for key in keys if len(payload) > 2 else []:
            values = payload[offset:offset + routing[key].numel()] / tokens
            offset += routing[key].numel()
            # One value: a number; more (one per expert, say): a list, logged element-wise.
            stats[key] = float(values[0]) if values.numel() == 1 else values.tolist()
        result.domains[domain] = DomainEval(loss=loss, ppl=perplexity(loss), routing=stats)
        total_loss += loss_sum
        total_tokens += tokens
    if total_tokens:
        result.loss = total_loss / total_tokens
        result.ppl = perplexity(result.loss)
    model.train(was_training)
    return result
