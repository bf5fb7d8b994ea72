"""run.init_from: a new run from a finished run's weights (fresh optimizer and step), sparse upcycling of a dense
run into MoE, and the one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY, TINY_GPT2, assert_ok, run_cli
from trainer.base.errors import UserError
from trainer.base.metrics import EVAL_LOSS, LEARNING_RATE


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


DENSE = [*TINY, *TINY_GPT2, "train.max_steps=4", "train.eval_every=4", "checkpoint.save_every=4",
         "optim.warmup_fraction=0.5"]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("init-from")
    assert_ok(run_cli([*DENSE, "run.name=dense", f"data.cache_dir={data_cache}", f"run.output_dir={out}"], cwd=out))
    return out / "dense"


def start_from(source, out, data_cache, *extra: str, base: list[str] = DENSE):
    return run_cli([*base, "train.eval_at_start=true", f"run.init_from={source}", f"data.cache_dir={data_cache}",
                    f"run.output_dir={out}", *extra], cwd=out)


def first_eval(run_dir) -> float:
    return next(r[EVAL_LOSS] for r in read_metrics(run_dir) if r["step"] == 0 and EVAL_LOSS in r)


def test_init_from_loads_the_weights_and_starts_a_fresh_optimizer_at_step_0(dense_run, tmp_path, data_cache):
    assert_ok(start_from(dense_run, tmp_path, data_cache, "run.name=tuned"))
    tuned = tmp_path / "tuned"
    source = json.loads((dense_run / "summary.json").read_text())
    # Step 0 of the new run evaluates the source's final weights.
    assert first_eval(tuned) == pytest.approx(source["final_eval"][EVAL_LOSS], rel=1e-6)
    rows = [r for r in read_metrics(tuned) if LEARNING_RATE in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the step starts over, and so does the schedule's warmup
    assert rows[0][LEARNING_RATE] < rows[1][LEARNING_RATE]
    checkpoint = torch.load(tuned / "ckpt-step-4.pt", weights_only=True)
    adam_steps = {float(s["step"]) for s in checkpoint["optimizer_state_dict"]["state"].values()}
    assert adam_steps == {4.0}  # a fresh AdamW: the source's 4 updates are not in its state
    summary = json.loads((tuned / "summary.json").read_text())
    recorded = summary["init_from"]
    assert recorded["path"] == str(dense_run / "final-model.safetensors") and recorded["step"] == 4
    import hashlib

    assert recorded["sha256"] == hashlib.sha256((dense_run / "final-model.safetensors").read_bytes()).hexdigest()
    sidecar = json.loads((tuned / "final-model.json").read_text())
    assert sidecar["init_from"] == recorded


def test_a_dense_run_upcycles_into_moe_with_unchanged_step_0_logits(dense_run, tmp_path, data_cache):
    # Experts start as exact copies of their block's MLP (no perturbation) and top-1 adds the expert's output
    # unscaled, so the MoE model computes the dense model's function: the same step-0 eval loss.
    moe = ["model=moe", "model.moe_layers=[1]", "model.num_experts=4", "model.expert_perturbation=0"]
    assert_ok(start_from(dense_run, tmp_path, data_cache, "run.name=upcycled", *moe))
    source = json.loads((dense_run / "summary.json").read_text())
    assert first_eval(tmp_path / "upcycled") == pytest.approx(source["final_eval"][EVAL_LOSS], rel=1e-5)
    assert json.loads((tmp_path / "upcycled" / "summary.json").read_text())["init_from"]["family"] == "dense"


def test_upcycled_experts_are_the_dense_mlp_and_the_logits_match():
    from models.registry import build_model, config_schema

    torch.manual_seed(0)
    sizes = dict(n_layer=2, n_embd=32, n_head=2, n_positions=16)
    dense = build_model(config_schema("dense")(**sizes), vocab_size=64, eos_id=0).eval()
    moe = build_model(config_schema("moe")(**sizes, moe_layers=[1], num_experts=4, expert_perturbation=0.0),
                      vocab_size=64, eos_id=0).eval()
    moe.load_initial_state(dense.state_dict(), dense.architecture())
    ids = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(moe.hf(ids).logits, dense.hf(ids).logits, rtol=0, atol=1e-5)
    mlp = dense.hf.transformer.h[1].mlp
    experts = moe.hf.transformer.h[1].mlp
    assert all(torch.equal(experts.w_fc[e], mlp.c_fc.weight) for e in range(4))
    # With the default perturbation the experts differ from one another, and only slightly from the MLP.
    nudged = build_model(config_schema("moe")(**sizes, moe_layers=[1], num_experts=4), vocab_size=64, eos_id=0)
    nudged.load_initial_state(dense.state_dict(), dense.architecture())
    w = nudged.hf.transformer.h[1].mlp.w_fc
    assert not torch.equal(w[0], w[1])
    assert (w[0] - mlp.c_fc.weight).abs().max() < 0.1 * mlp.c_fc.weight.abs().max()


@pytest.mark.parametrize("extra, message", [
    (["model=polyglu", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=2",
      "model.head_dim=16", "model.d_ff=64"], "holds a dense model but this run builds a polyglu model"),
    (["model.n_layer=3"], "model.n_layer=2 but this run builds model.n_layer=3"),
    (["run.resume=elsewhere/ckpt-step-4.pt"], "drop one"),
])
def test_init_from_refuses_another_family_or_size_or_a_resume_of_another_run(dense_run, tmp_path, data_cache, extra,
                                                                             message):
    base = [arg for arg in DENSE if arg not in TINY_GPT2] if "model=polyglu" in extra else DENSE
    result = start_from(dense_run, tmp_path, data_cache, "run.name=refused", *extra, base=base)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


def test_init_from_a_full_checkpoint_names_the_snapshot_of_that_step(dense_run, tmp_path, data_cache):
    result = start_from(dense_run / "ckpt-step-4.pt", tmp_path, data_cache, "run.name=refused")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"run.init_from={dense_run / 'model-step-4.safetensors'}" in result.stderr


def test_a_tokenizer_that_gained_tokens_grows_the_embeddings_at_their_mean(tmp_path, caplog):
    from models.registry import build_model, config_schema
    from trainer.checkpoint.init_from import InitSource, load_initial_weights
    from trainer.checkpoint.snapshots import save_model_snapshot

    cfg = config_schema("dense")(n_layer=1, n_embd=16, n_head=2, n_positions=16)
    source = build_model(cfg, vocab_size=64, eos_id=0)
    meta = {"step": 7, "preset": "p", "mode": "dense", "config": {}, "metrics_summary": {},
            "architecture": source.architecture()}
    weights = save_model_snapshot(tmp_path, "final-model", source.state_dict(), meta)
    grown = build_model(cfg, vocab_size=66, eos_id=0)  # two chat markers more
    with caplog.at_level("INFO"):
        record = load_initial_weights(grown, InitSource(str(tmp_path), weights, tmp_path / "tokenizer"))
    old, new = source.hf.transformer.wte.weight, grown.hf.transformer.wte.weight
    assert torch.equal(new[:64], old)
    assert torch.allclose(new[64:], old.mean(dim=0, keepdim=True).expand(2, -1))
    assert grown.hf.lm_head.weight.data_ptr() == new.data_ptr()  # still tied
    assert record["step"] == 7 and "new rows at the mean embedding" in caplog.text
    with pytest.raises(UserError, match="64-token vocabulary but this run's tokenizer has 60"):
        load_initial_weights(build_model(cfg, vocab_size=60, eos_id=0),
                             InitSource(str(tmp_path), weights, tmp_path / "tokenizer"))
