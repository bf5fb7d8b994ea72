"""Expert usage per domain per MoE layer of a finished run: do experts specialise on code, math or prose?

Every MoE run draws it at its end into <run_dir>/figures/expert_usage.png; this redraws it from the run's
metrics.jsonl (its last eval) and resolved_config.yaml (its MoE layers):

    python -m eval.expert_usage outputs/moe-main            # writes outputs/moe-main/figures/expert_usage.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from trainer.base.metrics import EVAL_LOSS, EvalMetrics


def last_eval(run_dir: Path) -> EvalMetrics:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [row for row in rows if EVAL_LOSS in row]
    return EvalMetrics.from_flat(evals[-1] if evals else {})


def moe_layers_of(run_dir: Path) -> list[int] | None:
    """The run's MoE blocks, from the config it recorded; None for a run of another family."""
    model = OmegaConf.load(Path(run_dir) / "resolved_config.yaml").get("model", {})
    layers = model.get("moe_layers")
    return list(layers) if layers is not None else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot expert usage per domain from a finished MoE run.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="PNG path (default <run_dir>/figures/expert_usage.png)")
    args = parser.parse_args(argv)
    if not (args.run_dir / "metrics.jsonl").is_file() or not (args.run_dir / "resolved_config.yaml").is_file():
        print(f"error: {args.run_dir} has no metrics.jsonl and resolved_config.yaml; give a run directory",
              file=sys.stderr)
        return 2
    layers, evaluation = moe_layers_of(args.run_dir), last_eval(args.run_dir)
    if layers is None or not evaluation.domains:
        print(f"error: {args.run_dir} is not an MoE run with an eval (model.moe_layers and a per-domain eval in "
              "metrics.jsonl are needed)", file=sys.stderr)
        return 2
    from models.moe.figures import plot_expert_usage

    written = plot_expert_usage(evaluation, layers, args.out or args.run_dir / "figures" / "expert_usage.png")
    if written is None:
        print(f"error: the last eval of {args.run_dir} has no per-domain routing statistics", file=sys.stderr)
        return 2
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
