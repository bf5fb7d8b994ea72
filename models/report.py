"""The sweep report contract: what a family's `models/<family>/report.py` adds to a comparison of runs.

A routed family summarises each run's routing from the run's record alone (no torch, no weights), so the report
(`python -m eval.compare`, and the end of every --multirun sweep) reads old and unfinished runs alike:
- `COLUMNS: dict[str, str]`: the table's family columns, name -> what the number is (the report's legend);
- `columns(record) -> dict[str, float | int | None]`: the run's value of each, None where it logged none;
- `curves(record) -> dict[str, list[tuple[int, float]]]`: panel title -> the run's (step, value) series; the
  report draws one panel per title with a line per job.
A family without the module (dense GPT-2) adds nothing. eval/report finds it through models.registry.family_report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from trainer.base.metrics import EvalMetrics, eval_history


@dataclass
class RunRecord:
    """A run as its directory records it."""

    model_config: dict[str, Any] = field(default_factory=dict)  # resolved_config.yaml's `model`
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl, in order

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every record that logged `key`."""
        return [(int(row["step"]), float(row[key])) for row in self.rows if key in row]

    def last(self, key: str) -> float | None:
        """The last logged value of `key`, or None if the run never logged it."""
        for row in reversed(self.rows):
            if key in row:
                return float(row[key])
        return None

    @cached_property
    def evals(self) -> list[tuple[int, EvalMetrics]]:
        """(step, eval) of every eval, in order."""
        return eval_history(self.rows)

    @property
    def final_eval(self) -> EvalMetrics | None:
        return self.evals[-1][1] if self.evals else None
