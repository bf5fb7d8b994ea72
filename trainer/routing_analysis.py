"""The routing analysis every routed run draws at its end, and what it reads: the run's eval record and samples
of its eval domains. The family draws (models/<family>/analysis.py); `python -m eval.analyze` redraws the same
for a finished run or snapshot, and takes named prompt categories instead of the eval domains."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from models.analysis import RoutingEvidence
from trainer.base.callbacks import Callback
from trainer.base.metrics import EvalMetrics, eval_history
from trainer.tracking import read_metrics

log = logging.getLogger(__name__)

FIGURES_DIR = "figures"
SAMPLE_BLOCKS = 8  # eval blocks per domain that a model-reading analysis runs through the model


def read_eval_history(run_dir: Path) -> list[tuple[int, EvalMetrics]]:
    """(step, eval) of every eval in the run's metrics.jsonl."""
    return eval_history(read_metrics(run_dir))


def eval_samples(eval_sets: dict, max_blocks: int = SAMPLE_BLOCKS) -> dict[str, list[dict]]:
    """The first `max_blocks` eval blocks of each domain, one block per batch (the batch contract)."""
    return {domain: [blocks.batch(np.array([i])) for i in range(min(len(blocks), max_blocks))]
            for domain, blocks in eval_sets.items() if len(blocks)}


class RoutingAnalysis(Callback):
    """At the end of a run (main process), the family's routing figures into <run_dir>/figures. A failure is
    logged with the command that redraws them: the run itself has finished and its snapshots are written."""

    name = "routing_analysis"

    def __init__(self, analysis, model, eval_sets: dict):
        self.analysis, self.model, self.eval_sets = analysis, model, eval_sets

    def on_train_end(self, run_dir, last_eval: EvalMetrics) -> None:
        run_dir = Path(run_dir)
        try:
            evidence = RoutingEvidence(architecture=self.model.architecture(), history=read_eval_history(run_dir))
            if self.analysis.NEEDS_MODEL:
                evidence.model, evidence.samples = self.model, eval_samples(self.eval_sets)
            written = self.analysis.analyze(evidence, run_dir / FIGURES_DIR)
        except Exception as err:  # figures must not fail a finished run
            log.warning("routing analysis failed (%s: %s); redraw it with: python -m eval.analyze %s",
                        type(err).__name__, err, run_dir, exc_info=True)
            return
        log.info("routing analysis: %s", ", ".join(path.name for path in written) or "nothing to draw")
