"""The trainer's own callback (the non-finite loss guard) and the list the loop calls; the protocol itself is
trainer.base.callbacks, which model families implement too."""

from __future__ import annotations

import math

from trainer.base.callbacks import Callback
from trainer.base.metrics import EvalMetrics, StepMetrics


class NonFiniteLossGuard(Callback):
    """Stops a run whose train or eval loss turned NaN/Inf, instead of burning the budget on garbage."""

    name = "non_finite_guard"

    def on_step_end(self, step: int, metrics: StepMetrics) -> str | None:
        if not math.isfinite(metrics.loss):
            return f"non-finite train loss ({metrics.loss}) at step {step}"
        return None

    def on_eval(self, step: int, metrics: EvalMetrics) -> str | None:
        bad = [k for k, v in metrics.losses().items() if not math.isfinite(v)]
        return f"non-finite {bad[0]} at step {step}" if bad else None


class CallbackList:
    def __init__(self, callbacks: list[Callback]):
        names = [c.name for c in callbacks]
        if len(set(names)) != len(names):
            raise ValueError(f"callback names must be unique (their state is saved by name): {names}")
        self.callbacks = callbacks

    def on_train_start(self, step: int) -> None:
        for c in self.callbacks:
            c.on_train_start(step)

    def on_train_end(self, run_dir, last_eval: EvalMetrics) -> None:
        for c in self.callbacks:
            c.on_train_end(run_dir, last_eval)

    def on_step_end(self, step: int, metrics: StepMetrics) -> str | None:
        reasons = [r for c in self.callbacks if (r := c.on_step_end(step, metrics))]
        return reasons[0] if reasons else None

    def eval_statistics(self, metrics: EvalMetrics) -> dict:
        derived: dict = {}
        for c in self.callbacks:
            derived.update(c.eval_statistics(metrics))
        return derived

    def on_eval(self, step: int, metrics: EvalMetrics) -> str | None:
        reasons = [r for c in self.callbacks if (r := c.on_eval(step, metrics))]
        return reasons[0] if reasons else None

    def state_dict(self) -> dict:
        return {c.name: c.state_dict() for c in self.callbacks}

    def load_state_dict(self, state: dict) -> None:
        for c in self.callbacks:
            if c.name in state:
                c.load_state_dict(state[c.name])
