"""The routing analysis contract: what a family's `models/<family>/analysis.py` receives and returns.

A routed family draws its own figures from a RoutingEvidence:
- `NEEDS_MODEL: bool`: whether it reads the weights and runs samples through the model (PolyGLU: static and
  input-dependent routing) or only the run's record (MoE: expert usage per eval from metrics.jsonl), so a caller
  loads a model and builds samples only when they are read;
- `analyze(evidence, out_dir) -> list[Path]`: the files it wrote into out_dir.
Every run of such a family calls it at its end (trainer/routing_analysis.py), and `python -m eval.analyze` for
a finished run or a snapshot. A family without the module (dense GPT-2) has no routing to analyse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainer.base.metrics import EvalMetrics


@dataclass
class RoutingEvidence:
    architecture: dict  # model.architecture() (or a snapshot's): the family, sizes and layout
    history: list[tuple[int, EvalMetrics]] = field(default_factory=list)  # (step, eval) in step order
    model: Any = None  # the nn.Module in eval mode, for families with NEEDS_MODEL
    # category -> batches in the batch contract (trainer/base/batch.py: input_ids [B, T], optional document_ids),
    # by default the run's eval domains, or the named prompt categories a user gives.
    samples: dict[str, list[dict]] = field(default_factory=dict)
