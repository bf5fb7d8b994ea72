"""The PolyGLU family's routing analysis (models/analysis.py): the seed paper's seven interpretability outputs.

Static routing is softmax(alpha), each neuron's input-independent preference among (ReLU, Tanh, SiLU, GELU).
Dynamic routing is measured on sample text by category: what gate_net output (the seed's hook) and what routing
actually used, g = softmax((alpha + beta * gate_net(pool(x))) / tau), per layer.
Entropies are in nats, of softmax(alpha) (static) and of softmax(logits) (dynamic), as the model reports them
during training (models/polyglu/stats.py); ln K is uniform routing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models import figures
from models.analysis import RoutingEvidence
from models.polyglu import figures as polyglu_figures
from models.polyglu.ffn import ACTIVATIONS, UNIFORM_ENTROPY, K, PolyGLU

NEEDS_MODEL = True


def entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of softmax over the last dimension."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@dataclass
class StaticRouting:
    entropy: Tensor  # [layers, d_ff] entropy of softmax(alpha)
    preferred: Tensor  # [layers, d_ff] argmax of alpha: index into ACTIVATIONS


def static_routing(alphas: list[Tensor]) -> StaticRouting:
    alpha = torch.stack([a.detach().double().cpu() for a in alphas])  # [L, d_ff, K]
    return StaticRouting(entropy=entropy(alpha), preferred=alpha.argmax(-1))


@dataclass
class CategoryRouting:
    """One category's dynamic routing, averaged over its tokens (a routing decision covering n tokens counts n)."""

    tokens: int
    gate_output: Tensor  # [layers, K] gate_net's raw output
    logit_shift: Tensor  # [layers, K] the input-dependent part of the logits, beta * gate_net
    probability: Tensor  # [layers, d_ff, K] the routing g that was used, per neuron
    entropy: Tensor  # [layers, d_ff] entropy of softmax(logits), per neuron


class _Recorder:
    """Sums one category's routing per layer from forward pre-hooks on the model's PolyGLU layers."""

    def __init__(self, ffns: list[PolyGLU]):
        self.ffns = ffns
        self.reset()
        self.handles = [ffn.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, ffn in enumerate(ffns)]

    def reset(self) -> None:
        self.tokens = 0
        self.sums: dict[int, dict[str, Tensor]] = {}

    def _hook(self, layer: int):
        def record(module: PolyGLU, args, kwargs) -> None:
            x, document_ids = args[0], kwargs.get("document_ids", args[1] if len(args) > 1 else None)
            pooled, _ = module.pool(x, document_ids)
            gate = module.gate(pooled)  # [B, T', K]
            logits, g = module.route(pooled)  # eval mode: no noise, as the model just routed
            weight = x.shape[1] / logits.shape[1]  # the mean pool routes a row once for all of its tokens
            sums = {"gate_output": gate.sum((0, 1)) * weight,
                    "logit_shift": (logits[:, :, 0, :] - module.alpha[0].to(logits.dtype)).sum((0, 1)) * weight,
                    "probability": g.sum((0, 1)) * weight, "entropy": entropy(logits).sum((0, 1)) * weight}
            layer_sums = self.sums.setdefault(layer, {})
            for name, value in sums.items():
                layer_sums[name] = layer_sums.get(name, 0) + value.double().cpu()
            if layer == 0:
                self.tokens += x.shape[0] * x.shape[1]
        return record

    def result(self) -> CategoryRouting:
        stacked = {name: torch.stack([self.sums[i][name] for i in range(len(self.ffns))]) / self.tokens
                   for name in ("gate_output", "logit_shift", "probability", "entropy")}
        return CategoryRouting(tokens=self.tokens, **stacked)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def dynamic_routing(model, samples: dict[str, list[dict]]) -> dict[str, CategoryRouting]:
    """Per category, the routing of every PolyGLU layer over the category's batches (eval mode, no noise)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    recorder = _Recorder(model.ffns())
    found = {}
    try:
        for category, batches in samples.items():
            recorder.reset()
            for batch in batches:
                ids = batch["input_ids"].to(device)
                documents = batch.get("document_ids")
                model(ids, document_ids=None if documents is None else documents.to(device))
            if recorder.tokens:
                found[category] = recorder.result()
    finally:
        recorder.close()
        model.train(was_training)
    return found


def _layer_spread(values: Tensor) -> dict:
    """{per_layer: {mean, std}, mean, std, normalised} of [layers, neurons] entropies."""
    mean = float(values.mean())
    return {"per_layer": {"mean": values.mean(1).tolist(), "std": values.std(1, unbiased=False).tolist()},
            "mean": mean, "std": float(values.std(unbiased=False)), "normalised": mean / UNIFORM_ENTROPY}


def spread_across_categories(per_category: list[Tensor]) -> Tensor:
    """[layers, K]: max minus min across categories of a [layers, K] quantity."""
    stacked = torch.stack(per_category)
    return stacked.max(0).values - stacked.min(0).values


def entropy_stats(static: StaticRouting, dynamic: dict[str, CategoryRouting], tau: float) -> dict:
    """entropy_stats.json: static and dynamic entropy (per layer mean/std, aggregate, ln K, normalised), the share
    of neurons preferring each activation, and per category what gate_net output and what routing used."""
    layers = static.entropy.shape[0]
    preferred_share = torch.stack([(static.preferred == k).double().mean(1) for k in range(K)], dim=1)  # [L, K]
    stats = {"activations": list(ACTIVATIONS), "ln_k": UNIFORM_ENTROPY, "layers": layers,
             "neurons_per_layer": static.entropy.shape[1], "tau": tau,
             "static": {**_layer_spread(static.entropy), "preferred_share": preferred_share.tolist()}}
    if dynamic:
        tokens = sum(r.tokens for r in dynamic.values())
        pooled = sum(r.entropy * r.tokens for r in dynamic.values()) / tokens  # token-weighted over categories
        stats["dynamic"] = {
            **_layer_spread(pooled), "tokens": tokens,
            "categories": {name: {**_layer_spread(r.entropy), "tokens": r.tokens,
                                  "gate_output": r.gate_output.tolist(), "logit_shift": r.logit_shift.tolist(),
                                  "routing_probability": r.probability.mean(1).tolist()}
                           for name, r in dynamic.items()},
            "shift_across_categories": {
                "logit_shift": spread_across_categories([r.logit_shift for r in dynamic.values()]).tolist(),
                "routing_probability": spread_across_categories(
                    [r.probability.mean(1) for r in dynamic.values()]).tolist()},
        }
    return stats


def save_dynamic_routing(dynamic: dict[str, CategoryRouting], path: Path) -> Path:
    """dynamic_routing.npz: per category (in `categories` order), what routing used per neuron, for analyses of
    one's own: probability [C, layers, d_ff, K], entropy [C, layers, d_ff], gate_output and logit_shift
    [C, layers, K], tokens [C]. Plain arrays: np.load reads it without unpickling."""
    names = list(dynamic)
    arrays = {field: np.stack([getattr(dynamic[n], field).numpy() for n in names]).astype(np.float32)
              for field in ("probability", "entropy", "gate_output", "logit_shift")}
    np.savez_compressed(path, categories=np.array(names), tokens=np.array([dynamic[n].tokens for n in names]),
                        **arrays)
    return path


def analyze(evidence: RoutingEvidence, out_dir: Path) -> list[Path]:
    """The seed's seven outputs into out_dir, and with samples dynamic_routing.npz (the per-neuron routing used);
    the two dynamic figures need samples (at least one category)."""
    model, out_dir = evidence.model, Path(out_dir)
    ffns = model.ffns()
    static = static_routing([ffn.alpha for ffn in ffns])
    dynamic = dynamic_routing(model, evidence.samples)
    stats = entropy_stats(static, dynamic, tau=float(ffns[0].tau))
    out_dir.mkdir(parents=True, exist_ok=True)
    stats_path = out_dir / "entropy_stats.json"
    stats_path.write_text(json.dumps(stats, indent=2) + "\n")
    drawn = {"neurotransmitter_heatmap.png": polyglu_figures.draw_heatmap(static.preferred),
             "layer_distribution.png": polyglu_figures.draw_layer_distribution(
                 np.array(stats["static"]["preferred_share"])),
             "entropy_per_layer.png": polyglu_figures.draw_entropy_per_layer(stats),
             "entropy_histogram.png": polyglu_figures.draw_entropy_histogram(static.entropy)}
    written = [stats_path]
    if dynamic:
        written.append(save_dynamic_routing(dynamic, out_dir / "dynamic_routing.npz"))
        drawn["dynamic_routing_comparison.png"] = polyglu_figures.draw_dynamic_comparison(
            {name: r.logit_shift for name, r in dynamic.items()})
        shift = stats["dynamic"]["shift_across_categories"]
        drawn["routing_shift_summary.png"] = polyglu_figures.draw_routing_shift(
            np.array(shift["logit_shift"]), np.array(shift["routing_probability"]), list(dynamic))
    return [*written, *(figures.save(fig, out_dir / name) for name, fig in drawn.items())]
