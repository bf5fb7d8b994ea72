"""The Checkpointer in-process: completed-run detection at both of its call sites, the payload it assembles and
restores, and the DeepSpeed layout and refusals, with a tiny GPT-2 on the single-process engine (no data built,
no DeepSpeed needed: the engine's native save is a stand-in)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from models.registry import build_model
from tests.conftest import TINY, TINY_GPT2, compose_validated
from trainer.base.callbacks import Callback
from trainer.base.errors import UserError
from trainer.callbacks import CallbackList
from trainer.checkpoint import FINAL_MODEL, Checkpointer, snapshot_paths
from trainer.checkpoint.files import deepspeed_dir
from trainer.config.validate import record_config
from trainer.engines.base import Engine
from trainer.optim import build_optimizer, build_scheduler
from trainer.run_state import LoopState


class Stream:
    """Stands in for the data stream: its position is all a checkpoint keeps of it."""

    def __init__(self, position: int = 0):
        self.position = position

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


class Counter(Callback):
    name = "counter"

    def __init__(self):
        self.count = 0

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


@dataclass
class Run:
    checkpointer: Checkpointer
    engine: Engine
    stream: Stream
    callbacks: CallbackList
    counter: Counter
    state: LoopState


def config(*overrides: str):
    return compose_validated([*TINY_GPT2, *TINY, "train.max_steps=4", *overrides])


def build_run(run_dir: Path, *overrides: str, engine_name: str | None = None, seed: int = 0) -> Run:
    cfg = config(*overrides)
    torch.manual_seed(seed)
    model = build_model(cfg.model, vocab_size=cfg.data.tokenizer.vocab_size, eos_id=0)
    engine = Engine(cfg.hardware)
    if engine_name is not None:
        engine.name = engine_name  # the DeepSpeed layout, without DeepSpeed
    optimizer = build_optimizer(model, cfg.optim)
    engine.setup(model, optimizer, build_scheduler(optimizer, cfg.optim, cfg.train.max_steps), cfg.train)
    counter = Counter()
    return Run(Checkpointer(cfg, run_dir, engine), engine, Stream(), CallbackList([counter]), counter, LoopState())


def update(run: Run) -> None:
    """One optimizer update, and what the loop would count along with it."""
    ids = torch.randint(0, 512, (2, 16))
    out = run.engine.forward({"input_ids": ids, "document_ids": torch.zeros_like(ids)})
    run.engine.backward(out.loss)
    run.engine.optimizer_step()
    run.state.step += 1
    run.state.tokens_seen += ids.numel()
    run.stream.position += 2
    run.counter.count += 1


# --------------------------------------------------------------------------- completed runs


def finished_run(run_dir: Path, *overrides: str, checkpoints=(2, 4), final_step: int = 4, status="completed",
                 final_model: bool = True) -> None:
    """What a finished run leaves that completed-run detection reads: its recorded config, checkpoints (names
    only: they are not opened), the final model and summary.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record_config(config(*overrides), run_dir)
    for step in checkpoints:
        (run_dir / f"ckpt-step-{step}.pt").write_bytes(b"not opened")
    if final_model:
        snapshot_paths(run_dir, FINAL_MODEL)[0].write_bytes(b"not opened")
    (run_dir / "summary.json").write_text(json.dumps({"status": status, "final_step": final_step}))


def completed(run_dir: Path, *overrides: str, step: int | None = None) -> dict | None:
    cfg = config(*overrides)
    return Checkpointer(cfg, run_dir, Engine(cfg.hardware)).completed_run(step)


def test_one_completed_run_test_answers_before_building_and_after_loading(tmp_path):
    """completed_run() is asked before anything is built (only for an unchanged re-launch with run.resume=auto)
    and again once a checkpoint is loaded; both answer by the same rule."""
    run_dir = tmp_path / "done"
    finished_run(run_dir)
    summary = {"status": "completed", "final_step": 4}
    assert completed(run_dir, "run.resume=auto") == summary
    assert completed(run_dir, "run.resume=auto", step=4) == summary
    # Not a re-launch with run.resume=auto and the recorded config: only the loaded checkpoint can tell.
    assert completed(run_dir) is None
    assert completed(run_dir, "run.resume=auto", "optim.learning_rate=0.0042") is None
    assert completed(run_dir, "run.resume=auto", "optim.learning_rate=0.0042", step=4) == summary
    # Resumed from an earlier checkpoint: there is a tail to train.
    assert completed(run_dir, "run.resume=auto", step=2) is None
    # Asked to train longer.
    assert completed(run_dir, "run.resume=auto", "train.max_steps=6", step=4) is None


@pytest.mark.parametrize("left", [
    {"final_model": False},  # killed between its last checkpoint and its final snapshot
    {"status": "interrupted"},  # a stop signal at the last update
    {"checkpoints": (2,)},  # the final checkpoint deleted to redo the tail from an earlier one
])
def test_a_run_not_completed_is_not_taken_for_one_at_either_point(tmp_path, left):
    run_dir = tmp_path / "unfinished"
    finished_run(run_dir, **left)
    assert completed(run_dir, "run.resume=auto") is None
    newest = 2 if "checkpoints" in left else 4
    assert completed(run_dir, "run.resume=auto", step=newest) is None


def test_without_a_final_checkpoint_summary_json_is_the_whole_record(tmp_path):
    """checkpoint.save_final=false writes no final checkpoint or model: the newest checkpoint is older than the
    end, and a run that completed at max_steps is complete whichever point asks."""
    run_dir = tmp_path / "no-final"
    finished_run(run_dir, "checkpoint.save_final=false", checkpoints=(3,), final_model=False)
    assert completed(run_dir, "run.resume=auto", "checkpoint.save_final=false") == {"status": "completed",
                                                                                    "final_step": 4}
    assert completed(run_dir, "checkpoint.save_final=false", step=4) is not None
    assert completed(run_dir, "checkpoint.save_final=false", step=3) is None


# --------------------------------------------------------------------------- payload, save and restore


def test_a_saved_step_comes_back_whole(tmp_path):
    """Weights, optimizer state, schedule, data position, callback state, loop state and RNG: what the step
    had is what a resumed run starts from."""
    run_dir = tmp_path / "run"
    run = build_run(run_dir, "checkpoint.keep_last_k=1", "checkpoint.keep_last_snapshots=1")
    for _ in range(2):
        update(run)
        run.checkpointer.save_if_due(run.state, run.stream, run.callbacks, final=False)  # save_every is 500
    assert not list(run_dir.glob("ckpt-step-*"))
    run.state.best_eval_loss, run.state.last_eval = 3.5, {"eval/loss": 3.5}
    run.checkpointer.save(run.state, run.stream, run.callbacks)  # a stop signal's save
    update(run)
    run.checkpointer.save_if_due(run.state, run.stream, run.callbacks, final=True)  # the run's last update
    expected_draw = torch.rand(4)  # what the uninterrupted run draws next
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "ckpt-step-3.pt", "model-step-3.json", "model-step-3.safetensors"]
    payload = torch.load(run_dir / "ckpt-step-3.pt", map_location="cpu", weights_only=True)
    assert (payload["format_version"], payload["step"], payload["engine"]) == (1, 3, "single")
    wall_time = payload["loop_state"].pop("wall_time_s")  # of every launch so far: a resumed run carries it on
    assert payload["loop_state"] == {"tokens_seen": 96, "best_eval_loss": 3.5, "last_eval": {"eval/loss": 3.5}}
    assert 0 < wall_time < 600
    assert set(payload["optimizer_state_dict"]["state"]) <= set(dict(run.engine.model.named_parameters()))
    sidecar = json.loads((run_dir / "model-step-3.json").read_text())
    assert sidecar["metrics_summary"] == {"eval/loss": 3.5, "best_eval_loss": 3.5, "tokens_seen": 96}

    resumed = build_run(run_dir, "run.resume=auto", seed=1)
    assert resumed.checkpointer.resume_source() == run_dir / "ckpt-step-3.pt"
    resumed.checkpointer.restore(run_dir / "ckpt-step-3.pt", resumed.stream, resumed.callbacks, resumed.state)
    assert torch.equal(torch.rand(4), expected_draw)
    assert (resumed.state.step, resumed.state.tokens_seen, resumed.state.last_eval) == (3, 96, {"eval/loss": 3.5})
    assert resumed.state.earlier_wall_time_s == wall_time and resumed.state.wall_time_s >= wall_time
    assert (resumed.stream.position, resumed.counter.count) == (6, 3)
    assert resumed.engine.scheduler.last_epoch == run.engine.scheduler.last_epoch == 3
    for (name, saved), (_, restored) in zip(run.engine.model.state_dict().items(),
                                            resumed.engine.model.state_dict().items(), strict=True):
        assert torch.equal(saved, restored), name
    moments = lambda engine: [s["exp_avg"] for s in engine.optimizer.state_dict()["state"].values()]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(moments(run.engine), moments(resumed.engine), strict=True))

    # The step it resumed from is on disk: saving it again writes nothing.
    before = (run_dir / "ckpt-step-3.pt").stat().st_mtime_ns
    resumed.checkpointer.save(resumed.state, resumed.stream, resumed.callbacks)
    assert (run_dir / "ckpt-step-3.pt").stat().st_mtime_ns == before


# --------------------------------------------------------------------------- the DeepSpeed layout


def test_deepspeed_state_is_staged_then_renamed_beside_its_checkpoint_and_pruned_with_it(tmp_path):
    run_dir = tmp_path / "zero"
    run = build_run(run_dir, "hardware.engine=deepspeed", "checkpoint.keep_last_k=1", engine_name="deepspeed")
    written = []

    def save_native(directory, tag):
        assert directory.name == "ckpt-step-1.deepspeed.tmp" and directory.parent == run_dir, directory
        (directory / tag).mkdir(parents=True)
        (directory / tag / "shard").write_bytes(b"partition")
        written.append(directory)

    run.engine.save_native = save_native
    update(run)
    run.checkpointer.save(run.state, run.stream, run.callbacks)
    assert written and (deepspeed_dir(run_dir, 1) / "state" / "shard").is_file()
    assert not list(run_dir.glob("*.tmp"))
    payload = torch.load(run_dir / "ckpt-step-1.pt", map_location="cpu", weights_only=True)
    assert payload["engine"] == "deepspeed"
    assert payload["optimizer_state_dict"] == {"deepspeed_checkpoint_tag": "state"}

    update(run)
    run.engine.save_native = lambda directory, tag: (directory / tag).mkdir(parents=True)
    run.checkpointer.save(run.state, run.stream, run.callbacks)
    assert sorted(p.name for p in run_dir.glob("ckpt-step-*")) == ["ckpt-step-2.deepspeed", "ckpt-step-2.pt"]


def test_deepspeed_refusals_are_decided_before_deepspeed_loads_anything(tmp_path):
    run_dir = tmp_path / "zero"
    run = build_run(run_dir, "hardware.engine=deepspeed", engine_name="deepspeed")
    run.engine.save_native = lambda directory, tag: (directory / tag).mkdir(parents=True)
    update(run)
    run.checkpointer.save(run.state, run.stream, run.callbacks)
    path = run_dir / "ckpt-step-1.pt"

    def resume(*overrides: str, engine_name: str | None = "deepspeed") -> list:
        resumed = build_run(tmp_path / "resumed", "hardware.engine=deepspeed", *overrides, engine_name=engine_name)
        loaded = []
        resumed.engine.load_native = lambda directory, tag: loaded.append((directory, tag))
        resumed.checkpointer.restore(path, resumed.stream, resumed.callbacks, resumed.state)
        return loaded

    assert resume() == [(deepspeed_dir(run_dir, 1), "state")]
    with pytest.raises(UserError, match="written by the deepspeed engine, whose optimizer state this single run"):
        resume(engine_name=None)
    with pytest.raises(UserError, match="zero_stage=2, which zero_stage=0 cannot read; resume with "
                                        "hardware.deepspeed.zero_stage=2"):
        resume("hardware.deepspeed.zero_stage=0")

    # Written by two processes (ZeRO partitions for two), resumed by one.
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload["rng_states_by_rank"] = [payload["rng_states_by_rank"][0]] * 2
    torch.save(payload, path)
    with pytest.raises(UserError, match=r"partitioned over 2 process\(es\).*torchrun --nproc_per_node=2\)$"):
        resume()

    payload["rng_states_by_rank"] = payload["rng_states_by_rank"][:1]
    torch.save(payload, path)
    (deepspeed_dir(run_dir, 1) / "state").rmdir()
    deepspeed_dir(run_dir, 1).rmdir()
    with pytest.raises(UserError, match="saved by DeepSpeed but ckpt-step-1.deepspeed is missing next to it"):
        resume()
