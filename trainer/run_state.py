"""What a run has done so far (updates, tokens, best and last eval, wall time, why it stopped): the loop advances
it, the checkpointer saves and restores it, fit.py reports it."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


@dataclass
class LoopState:
    step: int = 0  # optimizer updates done
    tokens_seen: int = 0
    best_eval_loss: float = math.inf
    last_eval: dict[str, float] = field(default_factory=dict)
    stop_reason: str | None = None
    stopped_by_signal: bool = False  # a pre-emption or Ctrl-C stop: the run is unfinished, not done
    # Wall time is counted across launches: a resumed run carries the time its checkpoint had taken, so a run cut
    # by pre-emption and finished later reports the time its steps took (work redone after the cut not counted
    # twice), and its tokens per second compare with an uninterrupted run's.
    launched_at: float = field(default_factory=time.time)  # when this launch started (fit.py: before building)
    earlier_wall_time_s: float = 0.0  # the launches before this one, up to the checkpoint it resumed from

    @property
    def wall_time_s(self) -> float:
        return self.earlier_wall_time_s + time.time() - self.launched_at

    def to_checkpoint(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "best_eval_loss": self.best_eval_loss,
                "last_eval": dict(self.last_eval), "wall_time_s": self.wall_time_s}

    def load(self, step: int, saved: dict) -> None:
        self.step = step
        self.tokens_seen = int(saved["tokens_seen"])
        self.best_eval_loss = float(saved["best_eval_loss"])
        self.last_eval = dict(saved["last_eval"])
        self.earlier_wall_time_s = float(saved.get("wall_time_s", 0.0))  # absent from checkpoints before it was kept
