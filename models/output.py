"""The one output type every model family returns, so the training loop never needs to know which family it runs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ModelOutput:
    loss: torch.Tensor  # what the loop backpropagates: lm_loss + sum(aux_losses.values())
    lm_loss: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # already multiplied by their coefficients
    # Detached scalars logged every step as train/<name> (e.g. the raw, unweighted auxiliary losses).
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    # Detached routing statistics (scalars or per-expert vectors), logged every train.log_router_every steps
    # as router/<name> and averaged per domain at eval.
    routing: dict[str, torch.Tensor] = field(default_factory=dict)


def lm_output(lm_loss: torch.Tensor, aux_losses: dict[str, torch.Tensor] | None = None,
              metrics: dict[str, torch.Tensor] | None = None,
              routing: dict[str, torch.Tensor] | None = None) -> ModelOutput:
    aux = aux_losses or {}
    total = lm_loss + sum(aux.values()) if aux else lm_loss
    return ModelOutput(loss=total, lm_loss=lm_loss, aux_losses=aux, metrics=metrics or {}, routing=routing or {})
