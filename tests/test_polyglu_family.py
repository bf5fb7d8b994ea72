"""The PolyGLU family through the trainer: parameter groups, tau, entropy metrics, the paper's size, resume."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import pytest
import torch

from eval.analyze import main as analyze_cli
from eval.compare import main as compare_cli
from eval.decoding import generate
from eval.generate import load_snapshot_model
from eval.param_count import count
from models.polyglu.callbacks import RoutingEntropyWarning, TauSchedule, tau_at
from models.polyglu.config import PolyGLUConfig
from models.registry import build_model
from tests.conftest import assert_ok, tiny_run
from tests.test_train_e2e import assert_same_weights, metrics, train_losses
from trainer.base.metrics import EvalMetrics
from trainer.optim import parameter_groups

PROMPTS = Path(__file__).resolve().parents[1] / "eval" / "prompts" / "math_categories.jsonl"
TINY = dict(d_model=32, d_ff=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, max_seq_len=64)
TINY_CLI = ["model=polyglu", "model.d_model=32", "model.d_ff=64", "model.n_layers=2", "model.n_heads=4",
            "model.n_kv_heads=2", "model.head_dim=8", "model.max_seq_len=64"]


def tiny_model(**overrides):
    return build_model(PolyGLUConfig(**{**TINY, **overrides}), vocab_size=97, eos_id=0)


def test_alpha_and_beta_never_decay_while_projections_do():
    """The paper decayed alpha for half its run because alpha is 2-D: pinned here."""
    groups = {g["role"]: set(g["names"]) for g in parameter_groups(tiny_model(), weight_decay=0.1)}
    alphas = {n for n in groups["no_decay"] | groups["decay"] if n.endswith(".alpha")}
    assert alphas and alphas <= groups["no_decay"]
    assert {n for n in groups["decay"] if n.endswith(".beta")} == set()
    assert any(n.endswith("W_gate.weight") for n in groups["decay"])
    assert not any("norm" in n for n in groups["decay"]), "norm scales never decay"


def test_tau_anneals_linearly_is_frozen_for_sft_and_is_reapplied_on_resume():
    assert tau_at(0, 1.0, 0.1, 100) == 1.0 and tau_at(50, 1.0, 0.1, 100) == pytest.approx(0.55)
    assert tau_at(100, 1.0, 0.1, 100) == pytest.approx(0.1) and tau_at(500, 1.0, 0.1, 100) == pytest.approx(0.1)
    assert tau_at(37, 1.0, 0.1, 100, frozen=0.1) == 0.1
    model = tiny_model()
    schedule = TauSchedule(model, 1.0, 0.1, 100, None)
    schedule.on_train_start(50)  # resumed after 50 updates
    assert all(f.tau == pytest.approx(0.55) for f in model.ffns())
    frozen = tiny_model(tau_frozen=0.1)
    assert all(f.tau == 0.1 for f in frozen.ffns())


def test_forward_reports_tau_and_routing_entropies_and_optional_regulariser():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 16))
    out = model(input_ids=ids, document_ids=torch.zeros_like(ids))
    assert float(out.metrics["tau"]) == 1.0
    assert out.routing["static_entropy/mean"] == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=1e-5)
    assert 0 < float(out.routing["dynamic_entropy/mean"]) <= torch.log(torch.tensor(4.0)).item() + 1e-5
    assert set(out.aux_losses) == set()
    # Without the regulariser no entropy graph outlives the forward: it would hold two routing-sized tensors per
    # layer through backward.
    assert all(not f.last_entropy.requires_grad for f in model.ffns())
    regularised = tiny_model(entropy_reg=0.01)
    out = regularised(input_ids=ids)
    assert set(out.aux_losses) == {"entropy_reg"} and float(out.aux_losses["entropy_reg"].detach()) < 0
    assert all(f.last_entropy.requires_grad for f in regularised.ffns())
    out.aux_losses["entropy_reg"].backward(retain_graph=True)
    assert regularised.ffns()[0].alpha.grad is not None and regularised.ffns()[0].alpha.grad.abs().sum() > 0


def test_tau_is_saved_with_the_weights_and_older_state_dicts_still_load():
    trained = tiny_model()
    trained.set_tau(0.25)
    state = trained.state_dict()
    assert state["net.layers.1.ffn._extra_state"].item() == 0.25
    restored = tiny_model()
    restored.load_state_dict(state)
    assert [f.tau for f in restored.ffns()] == [0.25, 0.25]
    older = {k: v for k, v in state.items() if not k.endswith("_extra_state")}  # written before tau was saved
    fresh = tiny_model()
    fresh.load_state_dict(older)
    assert [f.tau for f in fresh.ffns()] == [1.0, 1.0]


def test_entropy_warning_fires_below_the_threshold(caplog):
    warn = RoutingEntropyWarning(0.3)
    with caplog.at_level(logging.WARNING):
        warn.on_eval(10, EvalMetrics.from_flat({"eval/code/router/dynamic_entropy/mean": 0.5,
                                                "eval/math/router/dynamic_entropy/mean": 0.4}))
        assert not caplog.records
        warn.on_eval(20, EvalMetrics.from_flat({"eval/code/router/dynamic_entropy/mean": 0.2,
                                                "eval/math/router/dynamic_entropy/mean": 0.3}))
    assert "activation collapse" in caplog.text and "step 20" in caplog.text
    assert "consider model.entropy_reg > 0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # already regularised: the advice is to regularise more
        RoutingEntropyWarning(0.3, entropy_reg=0.01).on_eval(
            30, EvalMetrics.from_flat({"eval/code/router/dynamic_entropy/mean": 0.1}))
    assert "consider a larger model.entropy_reg than 0.01" in caplog.text


def test_the_paper_configuration_counts_its_published_parameters_without_memory():
    total, cfg = count(["preset=polyglu-pretrain"])
    assert cfg.model.n_layers == 28 and cfg.model.d_model == 1024
    assert total == 597_153_888


@pytest.mark.slow
def test_polyglu_shakedown_end_to_end_with_exact_resume(tmp_path, data_cache):
    common = ["preset=polyglu-shakedown", *TINY_CLI, "train.max_steps=6", "train.eval_every=3",
              "checkpoint.save_every=3", "train.log_router_every=3", "data.block_size=64"]
    assert_ok(tiny_run(tmp_path, data_cache, *common, name="whole", model_sizes=[]))
    whole = tmp_path / "whole"
    rows = metrics(whole)
    train_rows = [r for r in rows if "train/loss" in r]
    taus = [r["train/tau"] for r in train_rows]
    assert taus[0] == 1.0 and taus == sorted(taus, reverse=True) and taus[-1] < 1.0
    assert all({"train/lr", "train/tokens_per_sec", "train/routing_entropy"} <= set(r) for r in train_rows)
    assert [r["step"] for r in train_rows if "router/static_entropy/mean" in r] == [3, 6]
    last_eval = [r for r in rows if "eval/loss" in r][-1]
    assert all(f"eval/{d}/router/dynamic_entropy/layer1" in last_eval for d in ("code", "math", "prose"))

    outputs = {"entropy_stats.json", "dynamic_routing.npz", "neurotransmitter_heatmap.png", "layer_distribution.png",
               "entropy_per_layer.png", "entropy_histogram.png", "dynamic_routing_comparison.png",
               "routing_shift_summary.png"}
    assert {p.name for p in (whole / "figures").iterdir()} == outputs, "drawn at the end of the run"
    at_end = json.loads((whole / "figures" / "entropy_stats.json").read_text())
    assert set(at_end["dynamic"]["categories"]) == {"code", "math", "prose"}, "by default the eval domains"
    # The CLI, on the snapshot with the seed's named categories, and on the run directory with its eval domains.
    assert analyze_cli([str(whole / "final-model.safetensors"), "--prompts", str(PROMPTS), "--output",
                        str(tmp_path / "math")]) == 0
    named = json.loads((tmp_path / "math" / "entropy_stats.json").read_text())
    assert list(named["dynamic"]["categories"]) == ["arithmetic", "algebra", "geometry"]
    assert named["static"] == at_end["static"], "static routing is the weights alone"
    assert {p.name for p in (tmp_path / "math").iterdir()} == outputs
    assert analyze_cli([str(whole), "--output", str(tmp_path / "domains"), "--max-blocks", "2"]) == 0
    redrawn = json.loads((tmp_path / "domains" / "entropy_stats.json").read_text())
    assert set(redrawn["dynamic"]["categories"]) == {"code", "math", "prose"}
    assert all(c["tokens"] in (64, 128) for c in redrawn["dynamic"]["categories"].values()), "<= 2 blocks a domain"

    model, tokenizer, meta = load_snapshot_model(whole / "final-model.safetensors")
    assert meta["architecture"]["n_kv_heads"] == 2
    assert all(f.tau == pytest.approx(0.1) for f in model.ffns()), "the snapshot routes at its trained tau"
    assert named["tau"] == at_end["tau"] == pytest.approx(0.1)
    assert len(generate(model, [tokenizer.encode("x = ")], 4)[0].tokens) == 4

    assert_ok(tiny_run(tmp_path, data_cache, *common, f"run.resume={whole / 'ckpt-step-3.pt'}", name="resumed",
                       model_sizes=[]))
    resumed = tmp_path / "resumed"
    assert {s: v for s, v in train_losses(whole).items() if s > 3} == train_losses(resumed)
    assert_same_weights(whole / "final-model.safetensors", resumed / "final-model.safetensors")
    continued = [r["train/tau"] for r in metrics(resumed) if "train/tau" in r]
    assert continued == taus[3:], "tau continues where the interrupted run left it"
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["mode"] == "polyglu" and summary["final_step"] == 6

    # Two runs from separate launches, compared: the PolyGLU columns come from each run's record.
    assert compare_cli([str(whole), str(resumed)]) == 0
    with (tmp_path / "comparison" / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["whole", "resumed"] and rows[1]["run.resume"].endswith("ckpt-step-3.pt")
    assert all(float(r["tau"]) == pytest.approx(taus[-1]) for r in rows), "the last update's temperature"
    assert all(0 < float(r["dynamic_entropy"]) <= math.log(4) and 0 < float(r["static_entropy"]) <= math.log(4)
               for r in rows)
    assert rows[0]["final_eval_loss"] == rows[1]["final_eval_loss"], "an exact resume"
    assert (tmp_path / "comparison" / "routing.png").is_file()


class _TauSink:
    """Stands in for the model: records every tau the schedule applies."""

    def __init__(self):
        self.taus: list[float] = []

    def set_tau(self, tau: float) -> None:
        self.taus.append(tau)


def test_tau_resumed_under_a_longer_run_warns_of_the_jump(caplog):
    before = TauSchedule(_TauSink(), 1.0, 0.1, max_steps=10, frozen=None)
    before.on_train_start(0)
    for step in range(1, 7):
        before.on_step_end(step, {})
    state = before.state_dict()  # what a checkpoint at step 6 holds

    same = TauSchedule(sink := _TauSink(), 1.0, 0.1, max_steps=10, frozen=None)
    same.load_state_dict(state)
    with caplog.at_level(logging.WARNING):
        same.on_train_start(6)
    assert not caplog.records and sink.taus == [tau_at(6, 1.0, 0.1, 10)]

    longer = TauSchedule(_TauSink(), 1.0, 0.1, max_steps=20, frozen=None)
    longer.load_state_dict(state)
    with caplog.at_level(logging.WARNING):
        longer.on_train_start(6)
    assert "tau_schedule: resuming at step 6 with 0.73 where the checkpoint's run had 0.46" in caplog.text
