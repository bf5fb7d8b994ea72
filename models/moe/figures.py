"""The MoE family's figures, from its evals' routing statistics (so any finished run can be drawn again):

- expert_usage.png: expert usage per domain and MoE layer at one eval (the last);
- specialisation_over_time.png: I(domain; expert) per MoE layer against the step, and which domains each expert
  served at the first, middle and last eval.
"""

from __future__ import annotations

import numpy as np

from models.figures import pyplot
from models.moe.specialisation import domain_expert_information, domain_shares_per_expert
from models.moe.stats import expert_shares
from trainer.base.metrics import EvalMetrics


def usage_by_domain(evaluation: EvalMetrics, moe_layers: list[int]) -> dict[str, np.ndarray]:
    """{domain: [layers x experts] fractions}, rows in `moe_layers` order. A domain with no routing statistics
    at all is left out: under torchrun, one with fewer eval blocks than processes is evaluated without them."""
    return {domain: np.array([expert_shares(result.routing, layer) for layer in moe_layers])
            for domain, result in sorted(evaluation.domains.items()) if result.routing}


def draw_expert_usage(evaluation: EvalMetrics, moe_layers: list[int], title: str = "Expert usage per domain"):
    """The figure, or None when no domain of this eval carries routing statistics."""
    tables = usage_by_domain(evaluation, moe_layers)
    if not tables:
        return None
    plt = pyplot()
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
    fig.suptitle(title)
    return fig


def specialisation_curve(history: list[tuple[int, EvalMetrics]], layer: int) -> tuple[list[int], list[float]]:
    """(steps, I(domain; expert) in nats) of one MoE layer over the evals that compared two or more domains."""
    steps, values = [], []
    for step, evaluation in history:
        tables = usage_by_domain(evaluation, [layer])
        if len(tables) >= 2:
            steps.append(step)
            values.append(domain_expert_information({d: t[0] for d, t in tables.items()})[0])
    return steps, values


def draw_specialisation(history: list[tuple[int, EvalMetrics]], moe_layers: list[int]):
    """Top: I(domain; expert) per MoE layer against the step, with its ceiling log(min(domains, experts)).
    Below, a row per MoE layer: each expert's tokens by domain (p(domain | expert), domains weighted alike) at the
    first, middle and last eval. None when no eval compared two domains."""
    compared = [(step, ev) for step, ev in history if len(usage_by_domain(ev, moe_layers[:1])) >= 2]
    if not compared:
        return None
    plt = pyplot()
    picks = sorted({0, len(compared) // 2, len(compared) - 1})
    first_tables = usage_by_domain(compared[0][1], moe_layers)
    domains, n_experts = list(first_tables), next(iter(first_tables.values())).shape[1]
    fig = plt.figure(figsize=(max(7.0, 0.35 * n_experts * len(picks) + 2.0), 3.0 + 2.2 * len(moe_layers)),
                     constrained_layout=True)
    grid = fig.add_gridspec(1 + len(moe_layers), len(picks), height_ratios=[1.4] + [1.0] * len(moe_layers))
    curve = fig.add_subplot(grid[0, :])
    for layer in moe_layers:
        curve.plot(*specialisation_curve(compared, layer), marker="o", label=f"layer {layer}")
    ceiling = np.log(min(len(domains), n_experts))
    curve.axhline(ceiling, color="grey", linestyle="--", linewidth=1)
    curve.text(compared[0][0], ceiling, f" log({min(len(domains), n_experts)}): never share an expert",
               va="bottom", fontsize=8, color="grey")
    curve.set_ylim(0, ceiling * 1.15)
    curve.set_xlabel("step")
    curve.set_ylabel("I(domain; expert), nats")
    curve.set_title("Expert specialisation by domain at each eval")
    curve.legend(fontsize=8)
    colours = plt.get_cmap("tab10")
    for row, layer in enumerate(moe_layers, start=1):
        for col, pick in enumerate(picks):
            step, evaluation = compared[pick]
            tables = usage_by_domain(evaluation, [layer])
            shares = domain_shares_per_expert({d: t[0] for d, t in tables.items()})  # [experts x domains]
            ax = fig.add_subplot(grid[row, col])
            bottom = np.zeros(shares.shape[0])
            for d, domain in enumerate(tables):
                ax.bar(range(shares.shape[0]), shares[:, d], bottom=bottom, color=colours(d % 10), label=domain)
                bottom += shares[:, d]
            ax.set_ylim(0, 1)
            ax.set_xticks(range(shares.shape[0]))
            ax.set_title(f"layer {layer}, step {step}", fontsize=9)
            if col == 0:
                ax.set_ylabel("expert's tokens by domain")
            if row == len(moe_layers):
                ax.set_xlabel("expert")
    handles, labels = fig.axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8)
    return fig
