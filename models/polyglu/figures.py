"""The PolyGLU family's figures (the seed's names), drawn from models/polyglu/analysis.py's numbers.

Each draw_* returns a matplotlib figure; layouts follow the model's depth (rows or panels per layer), so the
paper's 28 layers and a 2-layer test model get the same figures.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from models.figures import panel_grid, pyplot
from models.polyglu.ffn import ACTIVATIONS, UNIFORM_ENTROPY

# One fixed colour per activation, in ACTIVATIONS order, in every figure.
ACTIVATION_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e")  # ReLU red, Tanh blue, SiLU green, GELU orange
LABELS = ("ReLU", "Tanh", "SiLU", "GELU")


def _layer_ticks(ax, layers: int, axis: str = "y") -> None:
    """Every layer labelled up to 32 layers, then every few, so deep models stay legible."""
    every = max(1, int(np.ceil(layers / 32)))
    ticks = list(range(0, layers, every))
    (ax.set_yticks if axis == "y" else ax.set_xticks)(ticks, [str(t) for t in ticks])


def _legend(ax, **kwargs) -> None:
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=n) for c, n in zip(ACTIVATION_COLOURS, LABELS, strict=True)], **kwargs)


def draw_heatmap(preferred: Tensor):
    """neurotransmitter_heatmap: each neuron's preferred activation (argmax alpha), a row per layer."""
    from matplotlib.colors import BoundaryNorm, ListedColormap

    plt = pyplot()
    layers, neurons = preferred.shape
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.22 * layers), constrained_layout=True)
    cmap = ListedColormap(ACTIVATION_COLOURS)
    ax.imshow(preferred.numpy(), cmap=cmap, norm=BoundaryNorm(np.arange(len(ACTIVATIONS) + 1) - 0.5, cmap.N),
              aspect="auto", interpolation="nearest")
    ax.set_xlabel(f"neuron (of {neurons})")
    ax.set_ylabel("layer")
    _layer_ticks(ax, layers)
    ax.set_title("Preferred activation of each neuron (argmax of alpha)")
    _legend(ax, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return fig


def draw_layer_distribution(shares: np.ndarray):
    """layer_distribution: per layer, stacked shares [layers, K] of neurons preferring each activation."""
    plt = pyplot()
    layers = shares.shape[0]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * layers + 2.5), 3.6), constrained_layout=True)
    bottom = np.zeros(layers)
    for k, (colour, label) in enumerate(zip(ACTIVATION_COLOURS, LABELS, strict=True)):
        ax.bar(range(layers), shares[:, k], bottom=bottom, color=colour, label=label, width=0.85)
        bottom += shares[:, k]
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of neurons")
    _layer_ticks(ax, layers, axis="x")
    ax.set_title("Preferred activation per layer")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def draw_entropy_per_layer(stats: dict):
    """entropy_per_layer: mean ± std over neurons of static entropy per layer (dynamic too when measured),
    with ln K, uniform routing, marked."""
    plt = pyplot()
    layers = stats["layers"]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * layers + 2.5), 3.6), constrained_layout=True)
    series = (("static", "static: softmax(alpha)", -0.1), ("dynamic", "dynamic: softmax(alpha + beta·gate_net)", 0.1))
    for key, label, offset in series:
        if key in stats:
            spread = stats[key]["per_layer"]
            ax.errorbar(np.arange(layers) + offset, spread["mean"], yerr=spread["std"], fmt="o", capsize=3,
                        markersize=4, label=label)
    ax.axhline(UNIFORM_ENTROPY, color="grey", linestyle="--", linewidth=1, label=f"ln {len(ACTIVATIONS)} (uniform)")
    ax.set_ylim(0, UNIFORM_ENTROPY * 1.1)
    ax.set_xlabel("layer")
    ax.set_ylabel("routing entropy per neuron (nats)")
    _layer_ticks(ax, layers, axis="x")
    ax.set_title("Routing entropy per layer (mean ± std over neurons)")
    ax.legend(fontsize=8)
    return fig


def draw_entropy_histogram(static_entropy: Tensor):
    """entropy_histogram: static entropy of every neuron of every layer."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6), constrained_layout=True)
    ax.hist(static_entropy.flatten().numpy(), bins=50, range=(0, UNIFORM_ENTROPY * 1.001), color="#555555")
    ax.axvline(UNIFORM_ENTROPY, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel(f"static routing entropy (nats; ln {len(ACTIVATIONS)} = {UNIFORM_ENTROPY:.3f} is uniform)")
    ax.set_ylabel("neurons")
    ax.set_title(f"Static routing entropy of all {static_entropy.numel()} neurons")
    return fig


def draw_dynamic_comparison(logit_shift: dict[str, Tensor]):
    """dynamic_routing_comparison: a panel per layer, the input-dependent logit beta * gate_net(pool(x)) of each
    activation, one bar per category: how each category moves the routing."""
    plt = pyplot()
    categories = list(logit_shift)
    layers = next(iter(logit_shift.values())).shape[0]
    fig, axes = panel_grid(layers)
    width = 0.8 / len(categories)
    colours = plt.get_cmap("tab10")
    for layer, ax in enumerate(axes):
        for c, category in enumerate(categories):
            ax.bar(np.arange(len(ACTIVATIONS)) + (c - (len(categories) - 1) / 2) * width,
                   logit_shift[category][layer].numpy(), width=width, color=colours(c % 10), label=category)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xticks(range(len(ACTIVATIONS)), LABELS, fontsize=7)
        ax.set_title(f"layer {layer}", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("Input-dependent routing logit (beta · gate_net) by category")
    return fig


def draw_routing_shift(logit_range: np.ndarray, probability_range: np.ndarray, categories: list[str]):
    """routing_shift_summary: per layer and activation ([layers, K] each), max minus min across categories of the
    input-dependent logit and of the routing probability that was used (mean over neurons)."""
    plt = pyplot()
    layers = logit_range.shape[0]
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 1.6 + 0.28 * layers), constrained_layout=True)
    panels = ((logit_range, "logit beta · gate_net", "{:.2f}"),
              (probability_range * 100, "routing probability used (points)", "{:.1f}"))
    for ax, (values, title, fmt) in zip(axes, panels, strict=True):
        image = ax.imshow(values, cmap="magma", aspect="auto", vmin=0)
        ax.set_xticks(range(len(ACTIVATIONS)), LABELS)
        ax.set_ylabel("layer")
        _layer_ticks(ax, layers)
        ax.set_title(title, fontsize=10)
        fig.colorbar(image, ax=ax)
        if layers <= 32:
            vmax = float(values.max()) or 1.0
            for (row, col), value in np.ndenumerate(values):
                ax.text(col, row, fmt.format(value), ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 * vmax else "black")
    fig.suptitle(f"Routing shift across {len(categories)} categories (max − min): {', '.join(categories)}")
    return fig
