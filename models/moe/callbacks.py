"""The MoE family's callbacks: router-noise annealing, collapse detection, domain specialisation at every eval."""

from __future__ import annotations

import logging

from models.moe import stats
from models.moe.specialisation import domain_expert_information
from trainer.base import metrics as metric_keys
from trainer.base.callbacks import Callback, StepSchedule
from trainer.base.metrics import EvalMetrics, StepMetrics

log = logging.getLogger(__name__)


def router_noise(step: int, initial: float, anneal_fraction: float, max_steps: int) -> float:
    """Noise for the update after `step` updates: linear from `initial` to 0 over anneal_fraction * max_steps."""
    if anneal_fraction <= 0:
        return initial
    horizon = anneal_fraction * max_steps
    return initial * max(0.0, 1.0 - step / horizon)


class RouterNoiseSchedule(StepSchedule):
    """Router noise advances on optimizer updates only and is re-applied exactly on resume."""

    name = "router_noise"

    def __init__(self, model, initial: float, anneal_fraction: float, max_steps: int):
        super().__init__(lambda step: router_noise(step, initial, anneal_fraction, max_steps), model.set_router_noise)


class CollapseDetector(Callback):
    """The seed's contract: every `check_every` updates, collapse = any expert's share of the step's tokens
    above `threshold` in any MoE layer (stats.largest_share: the logged fraction times top-k); `patience`
    consecutive collapsed checks stop the run."""

    name = "collapse_detector"

    def __init__(self, moe_layers: list[int], check_every: int = 100, threshold: float = 0.6, patience: int = 3,
                 topk: int = 1):
        self.moe_layers = list(moe_layers)
        self.check_every, self.threshold, self.patience, self.topk = check_every, threshold, patience, topk
        self.consecutive = 0

    def on_step_end(self, step: int, metrics: StepMetrics) -> str | None:
        if step % self.check_every:
            return None
        value, layer, expert = stats.largest_share(metrics.routing, self.moe_layers, self.topk)
        self.consecutive = self.consecutive + 1 if value > self.threshold else 0
        if self.consecutive:
            key = f"{metric_keys.router(stats.fraction(layer))}/{expert}"
            log.warning("step %d: %s=%.3f > %.2f (%d/%d consecutive checks)", step, key, value, self.threshold,
                        self.consecutive, self.patience)
        if self.consecutive >= self.patience:
            return (f"routing collapse: expert {expert} of layer {layer} took {value:.0%} of tokens "
                    f"(> {self.threshold:.0%}) at {self.patience} consecutive checks, ending at step {step}")
        return None

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive = int(state["consecutive"])


class DomainSpecialisation(Callback):
    """At every eval, per MoE layer: I(domain; expert) and its normalised form (models/moe/specialisation.py), from
    the eval's per-domain expert fractions; logged as eval/router/layer<L>/domain_mi[_norm]. Needs two domains."""

    name = "domain_specialisation"

    def __init__(self, moe_layers: list[int]):
        self.moe_layers = list(moe_layers)

    def eval_statistics(self, metrics: EvalMetrics) -> dict:
        routed = {domain: result.routing for domain, result in metrics.domains.items() if result.routing}
        if len(routed) < 2:
            return {}
        derived = {}
        for layer in self.moe_layers:
            information, normalised = domain_expert_information(
                {domain: stats.expert_shares(routing, layer) for domain, routing in routed.items()})
            derived[stats.domain_information(layer)] = information
            derived[stats.domain_information_normalised(layer)] = normalised
        return derived
