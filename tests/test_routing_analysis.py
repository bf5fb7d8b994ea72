"""Routing analysis: PolyGLU's entropy statistics and figures, MoE's domain-expert information, the CLI's refusals.
The end-to-end runs (figures at the end of a run, the CLI on a finished run) are in the family tests."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from data.config import DataConfig, DomainConfig, check_data
from eval.analyze import main as analyze_cli
from models.analysis import RoutingEvidence
from models.moe.callbacks import DomainSpecialisation
from models.moe.figures import draw_specialisation, specialisation_curve
from models.moe.specialisation import domain_expert_information, domain_shares_per_expert
from models.polyglu import analysis as polyglu_analysis
from models.polyglu import figures as polyglu_figures
from models.polyglu.config import PolyGLUConfig
from models.registry import build_model, routing_analysis
from trainer.base.errors import UserError
from trainer.base.metrics import EvalMetrics, eval_history

LN4 = math.log(4)


def hand_entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p)


def test_static_entropy_statistics_equal_a_hand_computation():
    distributions = [[[0.25] * 4, [0.7, 0.1, 0.1, 0.1]], [[0.4, 0.4, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]]]
    alphas = [torch.tensor(layer).log() + 3.0 for layer in distributions]  # softmax ignores the shift
    static = polyglu_analysis.static_routing(alphas)
    stats = polyglu_analysis.entropy_stats(static, {}, tau=0.5)

    per_neuron = [[hand_entropy(p) for p in layer] for layer in distributions]
    means = [sum(layer) / 2 for layer in per_neuron]
    stds = [abs(layer[0] - layer[1]) / 2 for layer in per_neuron]  # population std of two values
    flat = [h for layer in per_neuron for h in layer]
    mean = sum(flat) / 4
    std = math.sqrt(sum((h - mean) ** 2 for h in flat) / 4)
    assert stats["static"]["per_layer"]["mean"] == pytest.approx(means)
    assert stats["static"]["per_layer"]["std"] == pytest.approx(stds)
    assert stats["static"]["mean"] == pytest.approx(mean) and stats["static"]["std"] == pytest.approx(std)
    assert stats["ln_k"] == pytest.approx(LN4) and stats["static"]["normalised"] == pytest.approx(mean / LN4)
    assert per_neuron[0][0] == pytest.approx(LN4), "uniform routing is ln 4"
    # argmax: the uniform neuron's tie goes to the first activation (ReLU); then ReLU, ReLU (tie), GELU
    assert static.preferred.tolist() == [[0, 0], [0, 3]]
    assert stats["static"]["preferred_share"] == [[1.0, 0, 0, 0], [0.5, 0, 0, 0.5]]
    assert "dynamic" not in stats and stats["tau"] == 0.5


def test_heatmap_colours_are_the_argmax_of_a_random_alpha(tmp_path):
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    alpha = torch.randn(3, 12, 4, generator=torch.Generator().manual_seed(7))
    fig = polyglu_figures.draw_heatmap(polyglu_analysis.static_routing(list(alpha)).preferred)
    fig.canvas.draw()
    ax = fig.axes[0]
    centres = ax.transData.transform([(col, row) for row in range(3) for col in range(12)])
    fig.savefig(tmp_path / "heatmap.png", dpi=fig.dpi)
    pixels = imread(tmp_path / "heatmap.png")[..., :3]
    expected = alpha.argmax(-1).flatten().tolist()
    height = pixels.shape[0]
    for (x, y), activation in zip(centres, expected, strict=True):
        drawn = pixels[int(round(height - y)), int(round(x))]
        assert drawn == pytest.approx(to_rgb(polyglu_figures.ACTIVATION_COLOURS[activation]), abs=1 / 255)


def test_domain_expert_information_is_zero_alike_and_log_domains_when_disjoint():
    alike = {"code": [0.1, 0.2, 0.3, 0.4], "math": [0.1, 0.2, 0.3, 0.4], "prose": [0.1, 0.2, 0.3, 0.4]}
    assert domain_expert_information(alike) == pytest.approx((0.0, 0.0), abs=1e-12)
    disjoint = {"code": [0.5, 0.5, 0, 0, 0, 0], "math": [0, 0, 1.0, 0, 0, 0], "prose": [0, 0, 0, 0.2, 0.3, 0.5]}
    assert domain_expert_information(disjoint) == pytest.approx((math.log(3), 1.0))
    # By hand: two domains, two experts, p(e|code) = (0.9, 0.1), p(e|math) = (0.1, 0.9); p(e) = (0.5, 0.5).
    partial = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert domain_expert_information({"code": [0.9, 0.1], "math": [0.1, 0.9]}) == pytest.approx(
        (partial, partial / math.log(2)))
    # Fewer experts than domains: the ceiling is log(experts).
    assert domain_expert_information({"a": [1, 0], "b": [0, 1], "c": [0.5, 0.5]})[1] <= 1.0
    assert domain_shares_per_expert(disjoint)[:, 0].tolist() == [1, 1, 0, 0, 0, 0]


def moe_eval(step_shares: dict[str, list[float]], layer: int = 1) -> dict:
    row = {"eval/loss": 3.0}
    for domain, shares in step_shares.items():
        row[f"eval/{domain}/loss"] = 3.0
        row.update({f"eval/{domain}/router/layer{layer}/fraction/{e}": v for e, v in enumerate(shares)})
    return row


def test_specialisation_is_logged_across_domains_at_every_eval_and_read_back():
    evaluation = EvalMetrics.from_flat(moe_eval({"code": [1, 0, 0, 0], "math": [0, 1, 0, 0]}))
    evaluation.routing.update(DomainSpecialisation([1]).eval_statistics(evaluation))
    flat = evaluation.flat()
    assert flat["eval/router/layer1/domain_mi"] == pytest.approx(math.log(2))
    assert flat["eval/router/layer1/domain_mi_norm"] == pytest.approx(1.0)
    back = EvalMetrics.from_flat(flat)
    assert back.routing == evaluation.routing and set(back.domains) == {"code", "math"}, \
        "eval/router/* is read back as statistics across domains, not as a domain named 'router'"
    one_domain = EvalMetrics.from_flat(moe_eval({"code": [1, 0, 0, 0]}))
    assert DomainSpecialisation([1]).eval_statistics(one_domain) == {}


def test_specialisation_over_time_is_drawn_from_the_record():
    rows = [{"step": s, **moe_eval({"code": [0.25 + d, 0.25 - d, 0.25, 0.25],
                                    "math": [0.25 - d, 0.25 + d, 0.25, 0.25]})}
            for s, d in ((0, 0.0), (10, 0.1), (20, 0.2))]
    history = eval_history([{"step": 5, "train/loss": 3.0}, *rows])
    steps, values = specialisation_curve(history, 1)
    assert steps == [0, 10, 20] and values[0] == pytest.approx(0.0, abs=1e-12) and values == sorted(values)
    fig = draw_specialisation(history, [1])
    assert [ax.get_title() for ax in fig.axes[1:]] == ["layer 1, step 0", "layer 1, step 10", "layer 1, step 20"]
    assert draw_specialisation(eval_history([{"step": 1, **moe_eval({"code": [1, 0]})}]), [1]) is None


def test_a_28_layer_model_gets_every_output_with_a_panel_per_layer(tmp_path):
    cfg = PolyGLUConfig(d_model=16, d_ff=8, n_layers=28, n_heads=2, n_kv_heads=1, head_dim=8, max_seq_len=32)
    model = build_model(cfg, vocab_size=50, eos_id=0)
    generator = torch.Generator().manual_seed(0)
    for ffn in model.ffns():
        ffn.alpha.data.normal_(generator=generator)
    samples = {c: [{"input_ids": torch.randint(0, 50, (1, 12), generator=generator)}] for c in ("a", "b")}
    evidence = RoutingEvidence(architecture=model.architecture(), model=model, samples=samples)
    written = routing_analysis("polyglu").analyze(evidence, tmp_path)
    assert sorted(p.name for p in written) == sorted([
        "entropy_stats.json", "dynamic_routing.npz", "neurotransmitter_heatmap.png", "layer_distribution.png",
        "entropy_per_layer.png", "entropy_histogram.png", "dynamic_routing_comparison.png",
        "routing_shift_summary.png"])
    stats = json.loads((tmp_path / "entropy_stats.json").read_text())
    assert stats["layers"] == 28 and len(stats["static"]["per_layer"]["mean"]) == 28
    assert set(stats["dynamic"]["categories"]) == {"a", "b"}
    for category in stats["dynamic"]["categories"].values():
        assert np.allclose(np.sum(category["routing_probability"], axis=1), 1.0), "a distribution per layer"
        assert len(category["gate_output"]) == 28 and category["tokens"] == 12
    with np.load(tmp_path / "dynamic_routing.npz") as saved:  # no allow_pickle: plain arrays only
        assert saved["categories"].tolist() == ["a", "b"] and saved["probability"].shape == (2, 28, 8, 4)
        assert np.allclose(saved["probability"].sum(-1), 1.0, atol=1e-5), "per neuron, what routing used"
        per_layer = stats["dynamic"]["categories"]["a"]["routing_probability"]
        assert np.allclose(saved["probability"][0].mean(1), per_layer, atol=1e-6)
    dynamic = polyglu_analysis.dynamic_routing(model, samples)
    panels = polyglu_figures.draw_dynamic_comparison({c: r.logit_shift for c, r in dynamic.items()}).axes
    assert [ax.get_title() for ax in panels] == [f"layer {i}" for i in range(28)]
    assert polyglu_figures.draw_heatmap(polyglu_analysis.static_routing(
        [f.alpha for f in model.ffns()]).preferred).axes[0].images[0].get_array().shape == (28, 8)


def test_dynamic_routing_records_what_the_model_routed():
    """The recorder's routing probabilities equal those the PolyGLU layer itself computes on the same input."""
    cfg = PolyGLUConfig(d_model=16, d_ff=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, max_seq_len=32,
                        routing_pool="causal")
    model = build_model(cfg, vocab_size=50, eos_id=0).eval()
    ids = torch.randint(0, 50, (1, 10), generator=torch.Generator().manual_seed(1))
    seen = {}
    handle = model.ffns()[1].register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    recorded = polyglu_analysis.dynamic_routing(model, {"only": [{"input_ids": ids}]})["only"]
    handle.remove()
    with torch.no_grad():
        _, g = model.ffns()[1].routing(seen["x"])
    assert recorded.probability[1] == pytest.approx(g[0].mean(0).double(), abs=1e-6)
    assert recorded.tokens == 10


def test_a_domain_may_not_take_the_name_of_the_statistics_across_domains():
    with pytest.raises(UserError, match="may not contain '/' nor be 'router'"):
        check_data(DataConfig(domains={"router": DomainConfig()}), tokenizing=False)
    with pytest.raises(UserError, match="data.domains.a/b"):
        check_data(DataConfig(domains={"a/b": DomainConfig()}), tokenizing=False)


def test_cli_refusals_are_one_line(tmp_path, capsys):
    assert analyze_cli([str(tmp_path / "missing")]) == 2
    assert analyze_cli([str(tmp_path)]) == 2
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"category": "a", "text": "x"}\n{"text": "no category"}\n')
    with pytest.raises(UserError, match="line 2: expected a JSON object"):
        from eval.analyze import read_prompts

        read_prompts(bad, lambda text: [1, 2])
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and "does not exist" in errors[0] and "resolved_config.yaml" in errors[1]
