"""The MoE family through the trainer: warm start, schedules, collapse stop, artifacts, exact resume."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from eval.analyze import main as analyze_cli
from eval.decoding import generate
from eval.generate import load_snapshot_model
from eval.generate import main as generate_cli
from models.gpt2.config import GPT2Config
from models.moe import stats as moe_stats
from models.moe.callbacks import CollapseDetector, RouterNoiseSchedule, router_noise
from models.moe.config import MoEGPT2Config
from models.moe.stats import fraction
from models.registry import build_model
from tests.conftest import assert_ok, tiny_run
from tests.test_train_e2e import assert_same_weights, metrics, train_losses
from trainer.base.errors import UserError
from trainer.base.metrics import EvalMetrics, StepMetrics
from trainer.optim import parameter_groups

# A 2-block model with experts in its last block: the seed's layout in miniature.
TINY_MOE = ["model=moe", "model.moe_layers=[1]", "model.num_experts=4"]


def pair(topk: int, perturbation: float, seed: int = 0):
    sizes = dict(n_layer=3, n_embd=32, n_head=2, n_positions=64, dropout=0.0)
    torch.manual_seed(seed)
    dense = build_model(GPT2Config(**sizes), vocab_size=300, eos_id=0).eval()
    torch.manual_seed(seed)
    moe = build_model(MoEGPT2Config(**sizes, moe_layers=[1, 2], num_experts=8, topk=topk, noise_std=0.1,
                                    expert_perturbation=perturbation), vocab_size=300, eos_id=0).eval()
    return dense, moe


@pytest.mark.parametrize("topk", [1, 2])
def test_warm_start_matches_the_dense_model_at_step_0(topk):
    dense, moe = pair(topk, perturbation=0.0)
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        expected = dense.hf(input_ids=ids).logits
        torch.testing.assert_close(moe.hf(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        _, perturbed = pair(topk, perturbation=0.01)
        assert (perturbed.hf(input_ids=ids).logits - expected).abs().max() < 0.05, "small perturbation, small drift"


def test_moe_output_carries_weighted_aux_losses_and_routing():
    _, moe = pair(1, perturbation=0.01)
    moe.train()
    out = moe(input_ids=torch.randint(0, 300, (2, 16)))
    assert set(out.aux_losses) == {"lb", "z"}
    assert torch.allclose(out.loss, out.lm_loss + 0.01 * out.metrics["lb_loss"] + 0.001 * out.metrics["z_loss"])
    assert out.routing["layer1/fraction"].shape == (8,) and out.routing["layer2/fraction"].sum() == pytest.approx(1)
    out.loss.backward()
    assert moe.hf.transformer.h[1].mlp.router.weight.grad.abs().sum() > 0, "the router learns through the STE"
    arch = moe.architecture()
    assert (arch["family"], arch["moe_layers"], arch["num_experts"], arch["topk"]) == ("moe", [1, 2], 8, 1)


def test_expert_biases_do_not_decay_but_expert_matrices_do():
    _, moe = pair(1, perturbation=0.0)
    groups = {g["role"]: set(g["names"]) for g in parameter_groups(moe, weight_decay=0.1)}
    layer = "hf.transformer.h.1.mlp"
    assert {f"{layer}.b_fc", f"{layer}.b_proj"} <= groups["no_decay"]
    assert {f"{layer}.w_fc", f"{layer}.w_proj", f"{layer}.router.weight"} <= groups["decay"]


def test_moe_layers_are_checked_against_the_pretrained_depth():
    with pytest.raises(UserError, match="names block 5"):
        build_model(MoEGPT2Config(n_layer=3, n_embd=32, n_head=2, moe_layers=[5]), vocab_size=300, eos_id=0)


def test_router_noise_anneals_linearly_and_is_reapplied_on_resume():
    assert router_noise(0, 0.1, 0.25, 100) == pytest.approx(0.1)
    assert router_noise(10, 0.1, 0.25, 100) == pytest.approx(0.06)
    assert router_noise(25, 0.1, 0.25, 100) == 0.0 and router_noise(90, 0.1, 0.25, 100) == 0.0
    assert router_noise(90, 0.1, 0.0, 100) == pytest.approx(0.1), "anneal fraction 0 = constant noise"
    _, moe = pair(1, perturbation=0.0)
    schedule = RouterNoiseSchedule(moe, 0.1, 0.25, 100)
    schedule.on_train_start(10)  # a run resumed after 10 updates
    assert all(m.router.noise_std == pytest.approx(0.06) for m in moe.moe_modules())
    schedule.on_step_end(11, {})
    assert moe.moe_modules()[0].router.noise_std == pytest.approx(0.056)


def test_collapse_detector_needs_consecutive_checks_over_threshold():
    detector = CollapseDetector([9], check_every=100, threshold=0.6, patience=3)
    collapsed = StepMetrics({"train/loss": 3.0}, routing={fraction(9): [0.1, 0.0, 0.0, 0.9]})
    balanced = StepMetrics({"train/loss": 3.0}, routing={fraction(9): [0.5, 0.0, 0.0, 0.5]})
    assert detector.on_step_end(150, collapsed) is None, "only every check_every steps"
    assert detector.on_step_end(100, collapsed) is None and detector.on_step_end(200, collapsed) is None
    assert detector.on_step_end(300, balanced) is None, "a balanced check resets the count"
    for step in (400, 500):
        assert detector.on_step_end(step, collapsed) is None
    saved = detector.state_dict()
    resumed = CollapseDetector([9], 100, 0.6, 3)
    resumed.load_state_dict(saved)
    reason = resumed.on_step_end(600, collapsed)
    assert reason and "expert 3 of layer 9" in reason and "90%" in reason


def test_collapse_detector_judges_top2_by_share_of_tokens():
    """Top-2 assignment fractions never exceed 0.5; two experts taking every token is 0.5 each, which is
    every token's share, 100%, and must count as collapsed at the seed's 0.6."""
    detector = CollapseDetector([9], check_every=1, threshold=0.6, patience=1, topk=2)
    collapsed = StepMetrics({}, routing={fraction(9): [0.5, 0.5, 0, 0, 0, 0, 0, 0]})
    balanced = StepMetrics({}, routing={fraction(9): [0.125] * 8})
    assert detector.on_step_end(1, balanced) is None
    reason = detector.on_step_end(2, collapsed)
    assert reason and "took 100% of tokens" in reason


@pytest.mark.slow
def test_moe_shakedown_end_to_end_with_exact_resume(tmp_path, data_cache, capsys):
    common = ["preset=shakedown", *TINY_MOE, "train.max_steps=6", "train.eval_every=3", "checkpoint.save_every=3",
              "train.log_router_every=3", "model.noise_std=0.1", "model.noise_anneal_fraction=0.75"]
    assert_ok(tiny_run(tmp_path, data_cache, *common, name="whole"))
    whole = tmp_path / "whole"
    rows = metrics(whole)
    train_rows = [r for r in rows if "train/loss" in r]
    assert all({"train/lm_loss", "train/lb_loss", "train/z_loss", "train/aux/lb", "train/aux/z"} <= set(r)
               for r in train_rows), "all three losses every step"
    assert [r["step"] for r in train_rows if "router/layer1/fraction/0" in r] == [3, 6]
    noise = [r["train/router_noise_std"] for r in train_rows]
    assert noise[0] == pytest.approx(0.1) and noise[-1] == 0.0 and noise == sorted(noise, reverse=True)
    last_eval = [r for r in rows if "eval/loss" in r][-1]
    for domain in ("code", "math", "prose"):
        usage = [last_eval[f"eval/{domain}/router/layer1/fraction/{e}"] for e in range(4)]
        assert sum(usage) == pytest.approx(1.0)
    evals = [r for r in rows if "eval/loss" in r]
    assert all(0 <= r["eval/router/layer1/domain_mi"] <= math.log(3) + 1e-9 and
               0 <= r["eval/router/layer1/domain_mi_norm"] <= 1 + 1e-9 for r in evals), "specialisation at every eval"
    figures = whole / "figures"
    assert {p.name for p in figures.iterdir()} == {"expert_usage.png", "specialisation_over_time.png"}
    # The CLI redraws them from the record, elsewhere; --prompts is for analyses that run the model.
    assert analyze_cli([str(whole / "final-model.safetensors"), "--output", str(tmp_path / "again"),
                        "--prompts", "unused.jsonl"]) == 0
    assert {p.name for p in (tmp_path / "again").iterdir()} == {"expert_usage.png", "specialisation_over_time.png"}
    assert "--prompts is read by analyses that run the model" in capsys.readouterr().err

    sidecar = json.loads((whole / "final-model.json").read_text())
    assert sidecar["mode"] == "moe" and sidecar["architecture"]["moe_layers"] == [1]
    model, tokenizer, _ = load_snapshot_model(whole / "final-model.safetensors")
    assert len(generate(model, [tokenizer.encode("def main(")], 5)[0].tokens) == 5
    # The CLI: a run directory means its final model; GPT-2's position limit and bad sampling values are
    # one-line refusals, not an IndexError from the embedding (TINY_MOE has 64 positions).
    assert generate_cli([str(whole), "--prompt", "def main(", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert generate_cli([str(whole), "--max-new-tokens", "64"]) == 2
    assert generate_cli([str(whole), "--temperature", "-1"]) == 2
    refusals = capsys.readouterr().err.splitlines()
    assert len(refusals) == 2 and "exceeds the model's 64-position context; ask for at most 63" \
        in refusals[0] and "a temperature >= 0" in refusals[1]

    # Resume at step 3, mid-annealing: same noise, same losses, same weights as the uninterrupted run.
    assert_ok(tiny_run(tmp_path, data_cache, *common, f"run.resume={whole / 'ckpt-step-3.pt'}", name="resumed"))
    resumed = tmp_path / "resumed"
    assert {s: v for s, v in train_losses(whole).items() if s > 3} == train_losses(resumed)
    assert_same_weights(whole / "final-model.safetensors", resumed / "final-model.safetensors")


@pytest.mark.slow
def test_dense_checkpoint_is_refused_by_a_moe_run_and_back(tmp_path, data_cache):
    args = ["model.n_layer=2", "train.max_steps=2", "checkpoint.save_every=2"]
    assert_ok(tiny_run(tmp_path, data_cache, *args, name="dense"))
    refused = tiny_run(tmp_path, data_cache, *args, *TINY_MOE, "train.max_steps=4",
                       f"run.resume={tmp_path / 'dense' / 'ckpt-step-2.pt'}", name="moe")
    assert refused.returncode == 2
    assert "mode=dense" in refused.stderr and "mode=moe" in refused.stderr and "Traceback" not in refused.stderr
    assert "resume it with model=dense, or start a fresh run with another run.name" in refused.stderr


@pytest.mark.slow
def test_collapse_stop_ends_the_run_with_the_reason_in_the_summary(tmp_path, data_cache):
    # threshold 0.26 with 4 experts (0.25 each at even routing): almost any imbalance counts, so the stop
    # path runs in a few steps.
    result = tiny_run(tmp_path, data_cache, "preset=no-lb", *TINY_MOE, "train.max_steps=20",
                      "model.collapse_check_every=2", "model.collapse_threshold=0.26", "model.collapse_patience=2",
                      "train.eval_every=100", "checkpoint.save_every=100", name="collapse")
    assert_ok(result)
    summary = json.loads((tmp_path / "collapse" / "summary.json").read_text())
    assert summary["status"] == "stopped_early" and summary["final_step"] == 4
    assert "routing collapse" in summary["stop_reason"] and "at step 4" in summary["stop_reason"]
    assert (tmp_path / "collapse" / "final-model.safetensors").is_file()
    assert (tmp_path / "collapse" / "ckpt-step-4.pt").is_file(), "a stopped run can still be resumed or studied"


@pytest.mark.slow
def test_the_ablation_matrix_sweep_gives_comparable_run_directories(tmp_path, data_cache):
    # The seed's layout at toy width: 12 blocks, experts in 8-11 for the MoE presets.
    result = tiny_run(tmp_path, data_cache, "--multirun", "preset=dense,moe-main,top2", "model.n_layer=12",
                      "train.max_steps=2", "train.eval_every=2", "checkpoint.save_every=2",
                      "train.log_router_every=1", name=None)
    assert_ok(result)
    runs = sorted(p.parent for p in (tmp_path / "multirun").rglob("summary.json"))
    assert [r.name for r in runs] == ["0_dense", "1_moe-main", "2_top2"]
    sidecars = [json.loads((r / "final-model.json").read_text()) for r in runs]
    assert [s["mode"] for s in sidecars] == ["dense", "moe", "moe"]
    assert [s["architecture"].get("topk") for s in sidecars] == [None, 1, 2]
    base = {k: sidecars[0]["architecture"][k] for k in ("n_layer", "n_embd", "n_head", "vocab_size")}
    assert all({k: s["architecture"][k] for k in base} == base for s in sidecars), "one base for the matrix"
    assert all(s["architecture"]["moe_layers"] == [8, 9, 10, 11] for s in sidecars[1:])
    # The sweep's report compares the matrix as the seed's table did: MoE against dense, with the routing columns.
    sweep = runs[0].parent
    with (sweep / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["preset"], r["family"], r["status"]) for r in rows] == [
        ("dense", "dense", "completed"), ("moe-main", "moe", "completed"), ("top2", "moe", "completed")]
    assert rows[0]["vs_baseline_pct"] == "" and all(float(r["vs_baseline_pct"]) != 0 for r in rows[1:])
    assert rows[0]["lb_loss"] == "" and all(float(r["lb_loss"]) >= 1.0 for r in rows[1:]), "Switch lb: 1 balanced"
    assert 1 / 8 <= float(rows[1]["max_expert_share"]) <= 1 and 2 / 8 <= float(rows[2]["max_expert_share"]) <= 1
    assert all(0 <= float(r["domain_mi_norm"]) <= 1 for r in rows[1:])
    assert (sweep / "routing.png").is_file() and "Baseline: `0_dense`" in (sweep / "report.md").read_text()


def _collapsed_moe():
    """A 2-block model whose MoE block sees the same input at every token (its LayerNorm's output is its bias),
    so routing sends every token to one expert: collapse, whatever the weights."""
    _, moe = pair(1, perturbation=0.0)
    with torch.no_grad():
        for i in moe.moe_layers:
            moe.hf.transformer.h[i].ln_2.weight.zero_()
            moe.hf.transformer.h[i].ln_2.bias.normal_()
    return moe


def _step_metrics(moe) -> StepMetrics:
    """What the loop hands callbacks after an update of this model (one micro-batch, one process)."""
    out = moe(torch.randint(0, 300, (2, 16)))
    return StepMetrics({"train/loss": float(out.loss.detach())},
                       routing={k: v.tolist() if v.numel() > 1 else float(v) for k, v in out.routing.items()})


def test_collapse_stop_follows_a_renamed_statistic(monkeypatch):
    """Metric names are defined once (models/moe/stats.py): renaming the statistic renames what the model emits
    and what the collapse stop reads together, so the stop still fires."""
    monkeypatch.setattr(moe_stats, "fraction", lambda layer: f"moe_block{layer}/expert_share")
    moe = _collapsed_moe()
    metrics = _step_metrics(moe)
    assert "moe_block1/expert_share" in metrics.routing and "layer1/fraction" not in metrics.routing
    reason = CollapseDetector(moe.moe_layers, check_every=1, threshold=0.6, patience=1).on_step_end(1, metrics)
    assert reason and "took 100% of tokens" in reason


def test_collapse_stop_fails_loudly_when_the_model_stops_reporting_it(monkeypatch):
    """An emitter changed on its own (the model reports its fractions under another name) must not leave a
    collapse stop that quietly never fires: the first check raises, naming the statistic it needs."""
    moe = _collapsed_moe()
    forward = type(moe).forward

    def renamed(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.routing = {k.replace("/fraction", "/usage"): v for k, v in out.routing.items()}
        return out

    monkeypatch.setattr(type(moe), "forward", renamed)
    detector = CollapseDetector(moe.moe_layers, check_every=1, threshold=0.6, patience=1)
    with pytest.raises(RuntimeError, match="reported no routing statistic 'layer1/fraction'.*layer1/usage"):
        detector.on_step_end(1, _step_metrics(moe))


def test_expert_usage_figure_skips_domains_evaluated_without_routing():
    """Under torchrun, a domain with fewer eval blocks than processes is evaluated without routing statistics: the
    figure draws the others. A domain whose routing lacks the fractions is a bug and stops the figure loudly."""
    from models.moe.figures import draw_expert_usage

    evaluation = EvalMetrics.from_flat({"eval/loss": 3.0, "eval/code/loss": 3.0, "eval/math/loss": 3.1,
                                        **{f"eval/code/router/layer1/fraction/{e}": 0.25 for e in range(4)}})
    assert [ax.get_title() for ax in draw_expert_usage(evaluation, [1]).axes if ax.get_title()] == ["code"]
    assert draw_expert_usage(EvalMetrics.from_flat({"eval/code/loss": 3.0}), [1]) is None
    with pytest.raises(RuntimeError, match="reported no routing statistic 'layer2/fraction'"):
        draw_expert_usage(evaluation, [1, 2])
