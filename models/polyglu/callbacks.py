"""The PolyGLU family's callbacks: the Gumbel-softmax temperature schedule and the routing-collapse warning."""

from __future__ import annotations

import logging

from models.polyglu import stats
from trainer.base.callbacks import Callback, StepSchedule
from trainer.base.metrics import EvalMetrics

log = logging.getLogger(__name__)


def tau_at(step: int, start: float, end: float, max_steps: int, frozen: float | None = None) -> float:
    """Temperature for the update after `step` updates: linear from start to end over max_steps."""
    if frozen is not None:
        return frozen
    return start + (end - start) * min(1.0, step / max(1, max_steps))


class TauSchedule(StepSchedule):
    """The Gumbel-softmax temperature advances on optimizer updates only and is re-applied exactly on resume."""

    name = "tau_schedule"

    def __init__(self, model, start: float, end: float, max_steps: int, frozen: float | None):
        super().__init__(lambda step: tau_at(step, start, end, max_steps, frozen), model.set_tau)


class RoutingEntropyWarning(Callback):
    """The paper's signal to watch: mean dynamic routing entropy below ~0.3 nats means the neurons are
    collapsing onto one activation (PolyGLU degenerating to a plain GLU). Warns; does not stop."""

    name = "routing_entropy_warning"

    def __init__(self, threshold: float, entropy_reg: float = 0.0):
        self.threshold = threshold
        self.entropy_reg = entropy_reg

    def on_eval(self, step: int, metrics: EvalMetrics) -> None:
        values = []
        for domain, result in metrics.domains.items():
            if not result.routing:
                continue  # under torchrun, a domain with fewer eval blocks than processes has no routing statistics
            if stats.DYNAMIC_ENTROPY_MEAN not in result.routing:  # a bug, not a quiet "no collapse"
                raise RuntimeError(f"PolyGLU reported no routing statistic {stats.DYNAMIC_ENTROPY_MEAN!r} at the eval "
                                   f"of domain {domain!r}; the model's forward and models/polyglu/stats.py disagree")
            values.append(result.routing[stats.DYNAMIC_ENTROPY_MEAN])
        if values and (mean := sum(values) / len(values)) < self.threshold:
            advice = (f"consider a larger model.entropy_reg than {self.entropy_reg:g}" if self.entropy_reg > 0
                      else "consider model.entropy_reg > 0")
            log.warning("step %d: mean dynamic routing entropy %.3f < %.2f nats: activation collapse may be "
                        "under way (%s)", step, mean, self.threshold, advice)
        return None
