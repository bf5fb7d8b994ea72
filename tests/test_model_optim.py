"""Dense GPT-2 behind the family interface, AdamW groups by role, the schedule, callbacks, hub errors."""

from __future__ import annotations

import math
import time

import pytest
import torch

from models.gpt2.config import GPT2Config
from models.output import ModelOutput
from models.registry import build_model
from tests.conftest import clean_env, tiny_run
from trainer.base.errors import UserError
from trainer.base.hub import hub_reachable
from trainer.base.metrics import EvalMetrics, StepMetrics
from trainer.callbacks import CallbackList, NonFiniteLossGuard
from trainer.config.schema import OptimConfig
from trainer.optim import WarmupCosine, build_optimizer, parameter_groups, warmup_cosine


def tiny_gpt2(**overrides) -> torch.nn.Module:
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, dropout=0.0, **overrides)
    return build_model(cfg, vocab_size=300, eos_id=0)


def test_dense_model_returns_the_shared_output_type():
    model = tiny_gpt2()
    ids = torch.randint(0, 300, (2, 16))
    out = model(input_ids=ids, document_ids=torch.zeros_like(ids))
    assert isinstance(out, ModelOutput)
    assert out.loss.shape == () and torch.equal(out.loss, out.lm_loss) and out.aux_losses == {}
    assert math.isclose(float(out.lm_loss.detach()), math.log(300), rel_tol=0.1), "random init predicts ~uniformly"
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.architecture() == {"family": "dense", "n_layer": 2, "n_embd": 32, "n_head": 2,
                                    "n_positions": 64, "vocab_size": 300}


def test_parameter_groups_decay_only_matrices_and_honour_the_model_list():
    model = tiny_gpt2()
    groups = {g["role"]: set(g["names"]) for g in parameter_groups(model, weight_decay=0.1)}
    assert "hf.transformer.h.0.attn.c_attn.weight" in groups["decay"]
    assert "hf.transformer.h.0.attn.c_attn.bias" in groups["no_decay"]
    assert "hf.transformer.h.0.ln_1.weight" in groups["no_decay"], "norm scales never decay"
    assert "hf.transformer.ln_f.bias" in groups["no_decay"]

    model.no_weight_decay = lambda: {"hf.transformer.wpe.weight"}  # a 2-D parameter a family marks
    groups = {g["role"]: set(g["names"]) for g in parameter_groups(model, weight_decay=0.1)}
    assert "hf.transformer.wpe.weight" in groups["no_decay"]

    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decays = {g["role"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decays == {"decay": 0.1, "no_decay": 0.0}
    # Tied embedding / LM head appear once: each tensor is optimised exactly once.
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params})


def test_warmup_cosine_follows_max_steps():
    assert warmup_cosine(0, 100, 10, 0.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    scheduler = WarmupCosine(optimizer, total_steps=100, warmup_fraction=0.1)
    for _ in range(30):
        optimizer.step()
        scheduler.step()
    restored = WarmupCosine(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0), 100, 0.1)
    restored.load_state_dict(scheduler.state_dict())
    assert restored.get_last_lr() == scheduler.get_last_lr() == [pytest.approx(warmup_cosine(30, 100, 10, 0.0))]


def _stepped_schedule(total_steps: int, steps: int, lr: float = 1.0) -> WarmupCosine:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    scheduler = WarmupCosine(optimizer, total_steps=total_steps, warmup_fraction=0.0, warmup_steps=2)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return scheduler


def test_resume_with_more_steps_follows_the_new_schedule_and_says_so(caplog):
    """A run of 24 steps has decayed to lr 0; resumed with train.max_steps=32 it must not train on at 0."""
    finished = _stepped_schedule(total_steps=24, steps=24)
    assert finished.get_last_lr() == [pytest.approx(0.0)]
    optimizer_state = finished.optimizer.state_dict()

    extended = _stepped_schedule(total_steps=32, steps=0, lr=2.0)
    extended.optimizer.load_state_dict(optimizer_state)  # brings back the old schedule's lr 0, as a resume does
    with caplog.at_level("WARNING", logger="trainer.optim"):
        extended.load_state_dict(finished.state_dict())
    expected = 2.0 * warmup_cosine(24, 32, 2, 0.0)
    assert extended.last_epoch == 24 and expected > 0.1
    assert extended.get_last_lr() == [pytest.approx(expected)]
    assert extended.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    assert "train.max_steps 24 -> 32" in caplog.text and "optim.learning_rate 1.0 -> 2.0" in caplog.text
    extended.optimizer.step()
    extended.step()
    assert extended.get_last_lr() == [pytest.approx(2.0 * warmup_cosine(25, 32, 2, 0.0))]

    caplog.clear()
    same = _stepped_schedule(total_steps=24, steps=0)
    with caplog.at_level("WARNING", logger="trainer.optim"):
        same.load_state_dict(finished.state_dict())
    assert caplog.text == "" and same.get_last_lr() == finished.get_last_lr()


def test_non_finite_guard_stops_on_nan_train_or_eval_loss():
    callbacks = CallbackList([NonFiniteLossGuard()])
    assert callbacks.on_step_end(3, StepMetrics({"train/loss": 2.0})) is None
    assert "step 4" in callbacks.on_step_end(4, StepMetrics({"train/loss": float("nan")}))
    assert "eval/code/loss" in callbacks.on_eval(5, EvalMetrics.from_flat({"eval/code/loss": float("inf"),
                                                                            "eval/ppl": 1.0}))
    with pytest.raises(ValueError):
        CallbackList([NonFiniteLossGuard(), NonFiniteLossGuard()])


def test_pretrained_from_a_local_directory(tmp_path):
    source = tiny_gpt2()
    source.hf.save_pretrained(tmp_path / "tiny")
    loaded = build_model(GPT2Config(pretrained=str(tmp_path / "tiny")), vocab_size=300, eos_id=0)
    for (name, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(UserError, match="300-token vocabulary"):
        build_model(GPT2Config(pretrained=str(tmp_path / "tiny")), vocab_size=512, eos_id=0)


def test_pretrained_hub_name_offline_fails_fast_with_the_key(tmp_path, data_cache):
    started = time.monotonic()
    result = tiny_run(tmp_path, data_cache, "model.pretrained=gpt2", "data.tokenizer.name=gpt2")
    assert result.returncode == 2, result.stderr
    assert "model.pretrained='gpt2'" in result.stderr and "Hugging Face Hub" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60


@pytest.mark.skipif(hub_reachable(), reason="this machine reaches the hub: the offline path cannot be shown")
def test_hub_unreachable_without_offline_env_vars_is_detected_by_the_probe(tmp_path, data_cache):
    """No HF_HUB_OFFLINE: the real network probe must answer, in seconds, not a 60 s hang."""
    env = {k: v for k, v in clean_env().items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    started = time.monotonic()
    result = tiny_run(tmp_path, data_cache, "model.pretrained=gpt2", "data.tokenizer.name=gpt2", env=env)
    assert result.returncode == 2 and "model.pretrained='gpt2'" in result.stderr, result.stderr
    assert time.monotonic() - started < 60


def test_seed_hub_datasets_offline_name_the_dataset_and_the_offline_alternative(tmp_path, data_cache):
    result = tiny_run(tmp_path, data_cache, "data=mixed3")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "data.domains.code.dataset='codeparrot/codeparrot-clean'" in lines[0] and "data=embedded" in lines[0]
