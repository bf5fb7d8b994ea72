"""The MoE family's routing analysis (models/analysis.py): its figures come from the run's evals alone."""

from __future__ import annotations

from pathlib import Path

from models import figures
from models.analysis import RoutingEvidence
from models.moe.figures import draw_expert_usage, draw_specialisation

NEEDS_MODEL = False


def analyze(evidence: RoutingEvidence, out_dir: Path) -> list[Path]:
    """expert_usage.png (the last eval with routing statistics) and specialisation_over_time.png (every eval)."""
    layers = list(evidence.architecture["moe_layers"])
    written = []
    routed = [(step, ev) for step, ev in evidence.history if any(r.routing for r in ev.domains.values())]
    if routed:
        step, last = routed[-1]
        usage = draw_expert_usage(last, layers, title=f"Expert usage per domain (eval at step {step})")
        written.append(figures.save(usage, Path(out_dir) / "expert_usage.png"))
    specialisation = draw_specialisation(evidence.history, layers)
    if specialisation is not None:
        written.append(figures.save(specialisation, Path(out_dir) / "specialisation_over_time.png"))
    return written
