"""The MoE family's figure: expert usage per domain and layer, from one eval's routing statistics.

Drawn at the end of every MoE run into <run_dir>/figures/expert_usage.png (callbacks.ExpertUsageFigure), and
for a finished run by `python -m eval.expert_usage <run_dir>`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.moe.stats import expert_shares
from trainer.base.metrics import EvalMetrics


def usage_by_domain(evaluation: EvalMetrics, moe_layers: list[int]) -> dict[str, np.ndarray]:
    """{domain: [layers x experts] fractions}, rows in `moe_layers` order. A domain with no routing statistics
    at all is left out: under torchrun, one with fewer eval blocks than processes is evaluated without them."""
    return {domain: np.array([expert_shares(result.routing, layer) for layer in moe_layers])
            for domain, result in sorted(evaluation.domains.items()) if result.routing}


def plot_expert_usage(evaluation: EvalMetrics, moe_layers: list[int], path: Path) -> Path | None:
    """The figure at `path`; None when no domain of this eval carries routing statistics."""
    tables = usage_by_domain(evaluation, moe_layers)
    if not tables:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    domains = list(tables)
    n_experts = next(iter(tables.values())).shape[1]
    fig, axes = plt.subplots(1, len(domains), figsize=(1.2 + 0.45 * n_experts * len(domains),
                                                       0.5 * len(moe_layers) + 1.6),
                             squeeze=False, constrained_layout=True)
    vmax = max(float(t.max()) for t in tables.values())
    for ax, domain in zip(axes[0], domains, strict=True):
        image = ax.imshow(tables[domain], vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_title(domain)
        ax.set_xlabel("expert")
        ax.set_xticks(range(n_experts))
        ax.set_yticks(range(len(moe_layers)), [f"layer {layer}" for layer in moe_layers])
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
