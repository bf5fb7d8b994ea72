"""Expert usage per domain per MoE layer: do experts specialise on code, math or prose?

Drawn automatically at the end of an MoE run into <run_dir>/figures/expert_usage.png, from the last
eval's per-domain routing fractions; for a finished run, from its metrics.jsonl:

    python -m eval.expert_usage outputs/moe-main            # writes outputs/moe-main/figures/expert_usage.png
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

USAGE_KEY = re.compile(r"^eval/([^/]+)/router/layer(\d+)/fraction/(\d+)$")


def usage_by_domain(eval_metrics: dict[str, float]) -> tuple[dict[str, np.ndarray], list[int]]:
    """{domain: [layers x experts] fractions}, and the layer numbers (rows), from eval/<d>/router/... keys."""
    found: dict[tuple[str, int, int], float] = {}
    for key, value in eval_metrics.items():
        match = USAGE_KEY.match(key)
        if match:
            domain, layer, expert = match.group(1), int(match.group(2)), int(match.group(3))
            found[(domain, layer, expert)] = value
    domains = sorted({d for d, _, _ in found})
    layers = sorted({layer for _, layer, _ in found})
    experts = 1 + max((e for _, _, e in found), default=-1)
    tables = {d: np.array([[found.get((d, layer, e), 0.0) for e in range(experts)] for layer in layers])
              for d in domains}
    return tables, layers


def plot_expert_usage(eval_metrics: dict[str, float], path: Path) -> Path | None:
    tables, layers = usage_by_domain(eval_metrics)
    if not tables:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    domains = list(tables)
    n_experts = next(iter(tables.values())).shape[1]
    fig, axes = plt.subplots(1, len(domains), figsize=(1.2 + 0.45 * n_experts * len(domains), 0.5 * len(layers) + 1.6),
                             squeeze=False, constrained_layout=True)
    vmax = max(float(t.max()) for t in tables.values())
    for ax, domain in zip(axes[0], domains, strict=True):
        image = ax.imshow(tables[domain], vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_title(domain)
        ax.set_xlabel("expert")
        ax.set_xticks(range(n_experts))
        ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
        for (row, col), value in np.ndenumerate(tables[domain]):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value < 0.6 * vmax else "black")
    fig.colorbar(image, ax=axes[0].tolist(), label="token fraction")
    fig.suptitle("Expert usage per domain (eval)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def last_eval(run_dir: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [row for row in rows if "eval/loss" in row]
    return evals[-1] if evals else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot expert usage per domain from a finished MoE run.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="PNG path (default <run_dir>/figures/expert_usage.png)")
    args = parser.parse_args(argv)
    if not (args.run_dir / "metrics.jsonl").is_file():
        print(f"error: {args.run_dir} has no metrics.jsonl; give a run directory", file=sys.stderr)
        return 2
    written = plot_expert_usage(last_eval(args.run_dir), args.out or args.run_dir / "figures" / "expert_usage.png")
    if written is None:
        print(f"error: the last eval of {args.run_dir} has no per-domain routing (is it an MoE run?)", file=sys.stderr)
        return 2
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
