import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trainer.base.atomic_files import atomic_path
from trainer.base.errors import UserError
from trainer.checkpoint import files, full, snapshots
from trainer.checkpoint.optimizer_state import optimizer_state_from_named, optimizer_state_to_named
from trainer.rng import capture_rng_state, restore_rng_state, seed_everything


def _payload(step: int, **extra):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    payload = {
        "format_version": full.FORMAT_VERSION,
        "step": step,
        "preset": "quickstart",
        "mode": "dense",
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "scheduler_state_dict": scheduler.state_dict(),
        "config": {"train": {"max_steps": 10}, "betas": (0.9, 0.999)},
        "architecture": {"n_layer": 2, "n_embd": 8},
        "data_state": {"position": torch.tensor([1, 2, 3]), "epoch": 0},
        **capture_rng_state(),
    }
    payload.update(extra)
    return payload


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path, monkeypatch):
    """What a SIGKILL mid-save leaves (no cleanup runs) goes at the next start; everything else stays."""
    with monkeypatch.context() as killed:  # a killed process never reaches atomic_path's unlink
        killed.setattr(Path, "unlink", lambda self, missing_ok=False: None)
        with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "ckpt-step-2.pt") as tmp:
            tmp.write_bytes(b"half a checkpoint")
            raise KeyboardInterrupt
    (tmp_path / "ckpt-step-2.deepspeed.tmp" / "state").mkdir(parents=True)
    kept_files = ["ckpt-step-1.pt", ".gitignore", ".notes", "notes.tmp"]
    for name in kept_files:
        (tmp_path / name).write_bytes(b"keep")
    (tmp_path / "ckpt-step-1.deepspeed").mkdir()

    removed = files.remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == sorted([tmp.name, "ckpt-step-2.deepspeed.tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept_files, "ckpt-step-1.deepspeed"])
    assert files.remove_stale_temporaries(tmp_path / "missing") == []


def test_crash_inside_torch_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    def broken_save(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        full.save_full_checkpoint(tmp_path, 5, _payload(5))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", [-1, 2**32, 2**40])
def test_any_run_seed_seeds_every_generator(seed):
    # numpy's legacy seeding refuses these; the run used to crash with a traceback after preparing its data.
    draws = []
    for _ in range(2):
        seed_everything(seed)
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(1))))
    assert draws[0] == draws[1]


def test_full_checkpoint_round_trip_restores_rng_streams(tmp_path):
    seed_everything(123)
    payload = _payload(7)
    expected_python = [random.random() for _ in range(5)]
    expected_numpy = np.random.rand(5)
    expected_torch = torch.rand(5)

    path = full.save_full_checkpoint(tmp_path, 7, payload)
    assert path.name == "ckpt-step-7.pt"
    seed_everything(999)  # disturb every generator before restoring
    loaded = full.load_full_checkpoint(path, expected={"mode": "dense", "architecture": {"n_layer": 2, "n_embd": 8}})
    restore_rng_state(loaded)

    assert [random.random() for _ in range(5)] == expected_python
    np.testing.assert_array_equal(np.random.rand(5), expected_numpy)
    assert torch.equal(torch.rand(5), expected_torch)
    assert loaded["config"]["train"]["max_steps"] == 10
    assert torch.equal(loaded["data_state"]["position"], torch.tensor([1, 2, 3]))
    for key, value in payload["model_state_dict"].items():
        assert torch.equal(loaded["model_state_dict"][key], value)
    # Raw torch.load with weights_only must accept the file on its own (no trainer code involved).
    torch.load(path, map_location="cpu", weights_only=True)


def test_save_refuses_incomplete_or_unloadable_payloads(tmp_path):
    payload = _payload(1)
    del payload["numpy_random_state"]
    with pytest.raises(ValueError, match="numpy_random_state"):
        full.save_full_checkpoint(tmp_path, 1, payload)
    with pytest.raises(ValueError, match=r"payload\['data_state'\]\['array'\].*weights_only"):
        full.save_full_checkpoint(tmp_path, 1, _payload(1, data_state={"array": np.zeros(3)}))
    assert list(tmp_path.iterdir()) == []


def test_wrong_format_version_is_refused(tmp_path):
    path = tmp_path / "ckpt-step-3.pt"
    torch.save({**_payload(3), "format_version": 2}, path)
    with pytest.raises(UserError, match="format_version=2 .*format_version=1") as info:
        full.load_full_checkpoint(path)
    assert "\n" not in str(info.value)


def test_missing_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist.*run.resume=auto"):
        full.load_full_checkpoint(tmp_path / "ckpt-step-50.pt")
    foreign = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(2)}, foreign)
    with pytest.raises(UserError, match="not a checkpoint of this trainer"):
        full.load_full_checkpoint(foreign)
    garbage = tmp_path / "notes.pt"
    garbage.write_text("hello")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        full.load_full_checkpoint(garbage)


def test_mode_and_architecture_mismatch_is_refused(tmp_path):
    path = full.save_full_checkpoint(tmp_path, 50, _payload(50))
    # Each refusal names the override that would match the checkpoint (real config keys, not its field names).
    with pytest.raises(UserError, match="trained with mode=dense but this run is mode=moe; resume it with "
                                        "model=dense, or start a fresh run with another run.name"):
        full.load_full_checkpoint(path, expected={"mode": "moe"})
    with pytest.raises(UserError, match="architecture.n_layer=2 but this run is architecture.n_layer=4; "
                                        "resume it with model.n_layer=2,"):
        full.load_full_checkpoint(path, expected={"architecture": {"n_layer": 4, "n_embd": 8}})
    moe_path = full.save_full_checkpoint(tmp_path / "moe", 50, _payload(50, architecture={"moe_layers": [8, 9]}))
    with pytest.raises(UserError, match=r"resume it with model.moe_layers=\[8,9\],"):
        full.load_full_checkpoint(moe_path, expected={"architecture": {"moe_layers": [10, 11]}})
    with pytest.raises(UserError, match="architecture.n_experts"):
        full.load_full_checkpoint(path, expected={"architecture": {"n_layer": 2, "n_embd": 8, "n_experts": 8}})


def test_find_latest_skips_truncated_newest(tmp_path, caplog):
    for step in (10, 20, 30):
        full.save_full_checkpoint(tmp_path, step, _payload(step))
    newest = tmp_path / "ckpt-step-30.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    (tmp_path / "ckpt-step-40.pt").write_bytes(b"")

    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        latest = full.find_latest_checkpoint(tmp_path)
    assert latest == tmp_path / "ckpt-step-20.pt"
    assert "ckpt-step-30.pt" in caplog.text and "ckpt-step-40.pt" in caplog.text
    assert full.find_latest_checkpoint(tmp_path / "missing") is None


def test_list_sorts_numerically_and_prune_keeps_newest(tmp_path):
    for step in (5, 100, 20, 1000):
        full.save_full_checkpoint(tmp_path, step, _payload(step))
    state = nn.Linear(2, 2).state_dict()
    meta = {"step": 5, "preset": "p", "mode": "dense", "config": {}, "metrics_summary": {}}
    for stem in ("model-step-5", "best-model", "final-model"):
        snapshots.save_model_snapshot(tmp_path, stem, state, meta)

    assert [step for step, _ in files.list_full_checkpoints(tmp_path)] == [5, 20, 100, 1000]
    removed = files.prune_full_checkpoints(tmp_path, keep_last_k=2)
    assert sorted(p.name for p in removed) == ["ckpt-step-20.pt", "ckpt-step-5.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best-model.json", "best-model.safetensors", "ckpt-step-100.pt", "ckpt-step-1000.pt",
        "final-model.json", "final-model.safetensors", "model-step-5.json", "model-step-5.safetensors",
    ]


def test_snapshot_pruning_keeps_the_newest_steps_and_best_and_final(tmp_path):
    state = nn.Linear(2, 2).state_dict()
    meta = {"step": 5, "preset": "p", "mode": "dense", "config": {}, "metrics_summary": {}}
    for stem in ("model-step-5", "model-step-100", "model-step-20", "best-model", "final-model"):
        snapshots.save_model_snapshot(tmp_path, stem, state, meta)
    (tmp_path / "model-step-3.safetensors").write_bytes(b"weights whose sidecar an interrupted prune removed")

    removed = files.prune_model_snapshots(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["model-step-3.safetensors", "model-step-5.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best-model.json", "best-model.safetensors", "final-model.json", "final-model.safetensors",
        "model-step-100.json", "model-step-100.safetensors", "model-step-20.json", "model-step-20.safetensors",
    ]


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(11, 4)
        self.block = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 11, bias=False)
        self.lm_head.weight = self.wte.weight


def test_snapshot_round_trip_with_tied_weights(tmp_path):
    model = TiedLM()
    state = model.state_dict()
    metadata = {"step": 40, "preset": "quickstart", "mode": "dense", "config": {"lr": 1e-3},
                "metrics_summary": {"eval/loss": torch.tensor(2.5)}, "architecture": {"n_embd": 4}}
    weights = snapshots.save_model_snapshot(tmp_path, "model-step-40", state, metadata)

    sidecar = json.loads((tmp_path / "model-step-40.json").read_text())
    for key in snapshots.SIDECAR_REQUIRED_KEYS + ("architecture",):
        assert key in sidecar
    assert sidecar["tied_weights"] == {"lm_head.weight": "wte.weight"}
    assert sidecar["metrics_summary"] == {"eval/loss": 2.5}

    for handle in (weights, tmp_path / "model-step-40.json", tmp_path / "model-step-40"):
        loaded, meta = snapshots.load_model_snapshot(handle)
        assert set(loaded) == set(state)
        for name, tensor in state.items():
            assert torch.equal(loaded[name], tensor)
        assert loaded["lm_head.weight"] is loaded["wte.weight"]
        assert meta["step"] == 40 and meta["format_version"] == full.FORMAT_VERSION

    rebuilt = TiedLM()
    rebuilt.load_state_dict(loaded)
    assert rebuilt.lm_head.weight is rebuilt.wte.weight
    assert torch.equal(rebuilt.wte.weight, model.wte.weight)


def test_snapshot_copies_overlapping_views_apart(tmp_path):
    fused = torch.arange(12.0).reshape(3, 4)
    state = {"q": fused[0], "kv": fused[1:], "t": fused.t()}
    meta = {"step": 1, "preset": "p", "mode": "dense", "config": {}, "metrics_summary": {}}
    snapshots.save_model_snapshot(tmp_path, "views", state, meta)
    loaded, _ = snapshots.load_model_snapshot(tmp_path / "views.safetensors")
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor)


def test_missing_snapshot_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        snapshots.load_model_snapshot(tmp_path / "best-model")
    # A resume checkpoint given where a snapshot is wanted (eval.generate): named as such, with the way out.
    (tmp_path / "ckpt-step-100.pt").write_bytes(b"not read")
    with pytest.raises(UserError, match=r"is a resume checkpoint; pass the model snapshot of that step, .*"
                                        r"model-step-100\.safetensors, or the run directory"):
        snapshots.load_model_snapshot(tmp_path / "ckpt-step-100.pt")


def _two_group_adamw(model, decay_first: bool):
    decay = [model.block.weight, model.wte.weight]
    no_decay = [model.block.bias]
    groups = [{"params": decay, "weight_decay": 0.1, "lr": 1e-2},
              {"params": no_decay, "weight_decay": 0.0, "lr": 5e-3}]
    if not decay_first:
        groups = [groups[1], {**groups[0], "params": decay[::-1], "lr": 123.0}]  # lr must come from the checkpoint
    return torch.optim.AdamW(groups)


def _train_step(model, optimizer, seed):
    torch.manual_seed(seed)
    tokens = torch.randint(0, 11, (2, 5))
    logits = model.lm_head(model.block(model.wte(tokens)))
    loss = nn.functional.cross_entropy(logits.view(-1, 11), tokens.view(-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_optimizer_state_by_name_survives_regrouping(tmp_path, caplog):
    torch.manual_seed(0)
    original = TiedLM()
    optimizer = _two_group_adamw(original, decay_first=True)
    for seed in range(3):
        _train_step(original, optimizer, seed)
    named = optimizer_state_to_named(optimizer, dict(original.named_parameters()))
    assert set(named["state"]) == {"wte.weight", "block.weight", "block.bias"}

    payload = _payload(3, optimizer_state_dict=named, model_state_dict=original.state_dict())
    loaded = full.load_full_checkpoint(full.save_full_checkpoint(tmp_path, 3, payload))

    resumed = TiedLM()
    resumed.load_state_dict(loaded["model_state_dict"])
    regrouped = _two_group_adamw(resumed, decay_first=False)
    with caplog.at_level("WARNING", logger="trainer.checkpoint"):
        optimizer_state_from_named(regrouped, loaded["optimizer_state_dict"], dict(resumed.named_parameters()))
    assert regrouped.param_groups[1]["lr"] == 1e-2
    assert "optimizer settings" not in caplog.text  # same settings, only regrouped: nothing to say

    _train_step(original, optimizer, seed=42)
    _train_step(resumed, regrouped, seed=42)
    for (name, expected), (_, actual) in zip(original.named_parameters(), resumed.named_parameters(), strict=False):
        assert torch.equal(expected, actual), name

    one_per_param = torch.optim.AdamW([{"params": [p]} for p in resumed.parameters()])  # weight_decay 0.01
    with caplog.at_level("WARNING", logger="trainer.checkpoint"):
        optimizer_state_from_named(one_per_param, loaded["optimizer_state_dict"], dict(resumed.named_parameters()))
    assert [g["weight_decay"] for g in one_per_param.param_groups] == [0.1, 0.1, 0.0]
    # Settings travel with the state, and a run whose config says otherwise is told, not silently ignored.
    assert ("resuming keeps the checkpoint's optimizer settings: optim.weight_decay=0.0 (this run's config: 0.01); "
            "optim.weight_decay=0.1 (this run's config: 0.01)") in caplog.text


def test_optimizer_state_refuses_unknown_names_and_mixed_groups():
    model = TiedLM()
    optimizer = _two_group_adamw(model, decay_first=True)
    _train_step(model, optimizer, 0)
    named = optimizer_state_to_named(optimizer, dict(model.named_parameters()))

    renamed = {("encoder." + k if k == "block.bias" else k): v for k, v in model.named_parameters()}
    with pytest.raises(UserError, match="'block.bias'"):
        optimizer_state_from_named(_two_group_adamw(model, True), named, renamed)

    single_group = torch.optim.AdamW(model.parameters())
    with pytest.raises(UserError, match="share an optimizer group.*lr=0.01 and 0.005"):
        optimizer_state_from_named(single_group, named, dict(model.named_parameters()))


def test_summary_and_sidecar_json_is_strict_even_for_a_diverged_run(tmp_path):
    """NaN and Infinity are not JSON: jq, JavaScript and strict loaders reject a file holding them."""
    from trainer.base.json_files import to_json_bytes
    from trainer.fit import describe_outputs

    def strict(text: str):
        def refuse(constant):
            raise ValueError(f"non-standard JSON constant {constant}")
        return json.loads(text, parse_constant=refuse)

    summary = {"run_name": "diverged", "status": "stopped_early", "final_step": 3, "run_dir": str(tmp_path),
               "stop_reason": "non-finite train loss (nan) at step 3", "best_eval_loss": float("inf"),
               "final_eval": {"eval/loss": float("nan"), "eval/ppl": torch.tensor(float("inf"))},
               "losses": [1.5, float("-inf")], "n_parameters": np.int64(7)}
    written = strict(to_json_bytes(summary).decode())
    assert written["best_eval_loss"] is None and written["final_eval"] == {"eval/loss": None, "eval/ppl": None}
    assert written["losses"] == [1.5, None] and written["n_parameters"] == 7
    assert written["stop_reason"] == summary["stop_reason"]
    assert "eval loss nan (best nan)" in describe_outputs(written)


def test_a_process_the_checkpoint_has_no_random_state_for_keeps_its_own_stream():
    """Every process draws its own dropout masks and router noise (trainer/fit.py). Resumed on more processes
    than saved it, a new process must not take rank 0's state, or the two would draw the same for the rest of
    the run."""
    from types import SimpleNamespace

    from trainer.checkpoint.checkpointer import rng_state_for

    def engine(rank: int, world_size: int) -> SimpleNamespace:
        return SimpleNamespace(rank=rank, world_size=world_size, is_main=rank == 0)

    saved = {"rng_states_by_rank": [{"rank": 0}, {"rank": 1}]}
    assert rng_state_for(saved, engine(1, 2)) == {"rank": 1}
    assert rng_state_for(saved, engine(0, 1)) == {"rank": 0}
    assert rng_state_for(saved, engine(1, 3)) == {"rank": 1}
    assert rng_state_for(saved, engine(2, 3)) is None  # keeps the stream seeded with run.seed + rank


def test_hardware_deterministic_turns_on_deterministic_kernels(monkeypatch):
    from trainer.rng import use_deterministic_kernels

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        use_deterministic_kernels()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()  # a kernel without a twin warns, never stops
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        # SDPA's backwards that stay nondeterministic in warn-only mode are off; math and flash remain.
        assert not torch.backends.cuda.mem_efficient_sdp_enabled() and not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cuda.enable_mem_efficient_sdp(True)
        torch.backends.cuda.enable_cudnn_sdp(True)
