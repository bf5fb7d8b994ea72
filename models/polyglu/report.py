"""The PolyGLU family in a sweep report (the contract: models/report.py): where the temperature ended, and how
decided the neurons' mix of activations is, by their static preference alone and as routed per token."""

from __future__ import annotations

from models.polyglu import stats
from models.report import RunRecord
from trainer.base import metrics as keys
from trainer.base.metrics import EvalMetrics

COLUMNS = {
    "tau": "the Gumbel-softmax temperature at the last logged step",
    "static_entropy": "entropy (nats) of softmax(alpha), the neurons' static mix, at the last eval, mean over layers "
                      "(uniform over 4 activations: ln 4 = 1.386)",
    "dynamic_entropy": "entropy (nats) of the routing used per token at the last eval, mean over layers and eval "
                       "domains",
}


def _mean_over_domains(evaluation: EvalMetrics, stat: str) -> float | None:
    values = [result.routing[stat] for result in evaluation.domains.values() if stat in result.routing]
    return sum(values) / len(values) if values else None


def columns(record: RunRecord) -> dict[str, float | int | None]:
    final = record.final_eval
    return {
        "tau": record.last(keys.train_metric(stats.TAU)),
        "static_entropy": _mean_over_domains(final, stats.STATIC_ENTROPY_MEAN) if final else None,
        "dynamic_entropy": _mean_over_domains(final, stats.DYNAMIC_ENTROPY_MEAN) if final else None,
    }


def curves(record: RunRecord) -> dict[str, list[tuple[int, float]]]:
    dynamic = [(step, value) for step, evaluation in record.evals
               if (value := _mean_over_domains(evaluation, stats.DYNAMIC_ENTROPY_MEAN)) is not None]
    return {"PolyGLU: dynamic routing entropy at eval (nats)": dynamic}
