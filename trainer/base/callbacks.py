"""The callback protocol: what the loop calls after each update, at each eval and at the end of a run.

Model families implement it for their schedules (router noise, tau), monitors (collapse stop, entropy warning)
and per-eval statistics (MoE specialisation); the trainer adds its own (the non-finite loss guard, the routing
analysis at the end of a run). A callback's state (if any) goes into every
full checkpoint and comes back on resume.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from trainer.base.metrics import EvalMetrics, Stat, StepMetrics

log = logging.getLogger(__name__)


class Callback:
    name = "callback"

    def on_train_start(self, step: int) -> None:
        """Before the first update of this process (step > 0 when resuming): re-apply step-derived state."""

    def on_step_end(self, step: int, metrics: StepMetrics) -> str | None:
        """Called after optimizer step `step` with that step's metrics; return a reason to stop early."""
        return None

    def eval_statistics(self, metrics: EvalMetrics) -> dict[str, Stat]:
        """Statistics this callback derives from an eval's domains together (the MoE family's domain-expert
        information), by name; the loop adds them to the eval's `routing` before it is logged and on_eval runs,
        so they are in metrics.jsonl and W&B as eval/router/<name>."""
        return {}

    def on_eval(self, step: int, metrics: EvalMetrics) -> str | None:
        """Called after each eval; return a reason to stop early."""
        return None

    def on_train_end(self, run_dir, last_eval: EvalMetrics) -> None:
        """Once, on the main process, after the last step: artifacts such as figures."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class StepSchedule(Callback):
    """A value that is a pure function of the optimizer step (router noise, Gumbel tau), applied before
    every update. Being a function of the step, it needs no saved state: on_train_start re-applies the
    value a resumed run had at its step, so resume is exact."""

    def __init__(self, value_at: Callable[[int], float], apply: Callable[[float], None]):
        self.value_at, self.apply = value_at, apply
        self.applied: float | None = None
        self.saved: float | None = None  # the value the checkpoint's run had applied, once resumed

    def on_train_start(self, step):
        value = self.value_at(step)
        if self.saved is not None and not math.isclose(value, self.saved, rel_tol=1e-6, abs_tol=1e-12):
            # Resumed under another schedule (typically a larger train.max_steps): say so, as the lr
            # scheduler does, since the value jumps at this step instead of continuing smoothly.
            log.warning("%s: resuming at step %d with %.4g where the checkpoint's run had %.4g: it follows this "
                        "run's config (train.max_steps or the schedule's own keys changed)", self.name, step,
                        value, self.saved)
        self._apply(value)

    def on_step_end(self, step, metrics):
        self._apply(self.value_at(step))
        return None

    def _apply(self, value: float) -> None:
        self.applied = value
        self.apply(value)

    # Not needed for an exact resume (the value is a function of the step); kept to notice a changed schedule.
    def state_dict(self) -> dict:
        return {} if self.applied is None else {"applied": self.applied}

    def load_state_dict(self, state: dict) -> None:
        self.saved = state.get("applied")
