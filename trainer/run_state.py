"""What a run has done so far (updates, tokens, best and last eval, why it stopped): the loop advances it, the
checkpointer saves and restores it, fit.py reports it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class LoopState:
    step: int = 0  # optimizer updates done
    tokens_seen: int = 0
    best_eval_loss: float = math.inf
    last_eval: dict[str, float] = field(default_factory=dict)
    stop_reason: str | None = None
    stopped_by_signal: bool = False  # a pre-emption or Ctrl-C stop: the run is unfinished, not done

    def to_checkpoint(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "best_eval_loss": self.best_eval_loss,
                "last_eval": dict(self.last_eval)}

    def load(self, step: int, saved: dict) -> None:
        self.step = step
        self.tokens_seen = int(saved["tokens_seen"])
        self.best_eval_loss = float(saved["best_eval_loss"])
        self.last_eval = dict(saved["last_eval"])
