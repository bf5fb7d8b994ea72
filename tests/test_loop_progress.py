"""The progress bar, driven in-process through fit.train with tqdm replaced by a recorder."""

from __future__ import annotations

import json

import pytest

import trainer.loop as loop_module
from tests.conftest import TINY, TINY_GPT2, compose_validated
from trainer.fit import train


class RecordingBar:
    """Stands in for tqdm: records which postfix each step's update() would draw."""

    drawn: list[tuple[int, dict]] = []

    def __init__(self, total, initial=0, **_):
        self.n, self.total, self.postfix = initial, total, {}

    def set_postfix(self, refresh=True, **postfix):
        self.postfix = dict(postfix)

    def update(self, n=1):
        self.n += n
        RecordingBar.drawn.append((self.n, dict(self.postfix)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        RecordingBar.drawn.append(("closed", {}))


def test_each_step_of_the_bar_shows_that_steps_loss(tmp_path, data_cache, monkeypatch):
    cfg = compose_validated([*TINY_GPT2, *TINY, f"data.cache_dir={data_cache}", "train.max_steps=5",
                             "train.log_every=1"])
    RecordingBar.drawn = []
    monkeypatch.setattr(loop_module, "tqdm", RecordingBar)
    run_dir = tmp_path / "run"
    train(cfg, run_dir)

    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {row["step"]: row["train/loss"] for row in logged if "train/loss" in row}
    assert [step for step, _ in RecordingBar.drawn] == [1, 2, 3, 4, 5, "closed"]
    for step, postfix in RecordingBar.drawn[:-1]:
        assert postfix["loss"] == f"{losses[step]:.4f}", f"step {step} drew {postfix}, logged {losses[step]}"
        assert float(postfix["tok_s"]) > 0


def test_an_error_escaping_a_step_closes_the_bar_first(tmp_path, data_cache, monkeypatch):
    """Otherwise the error's message is printed after the bar's last partial line."""
    cfg = compose_validated([*TINY_GPT2, *TINY, f"data.cache_dir={data_cache}", "train.max_steps=5"])
    RecordingBar.drawn = []
    monkeypatch.setattr(loop_module, "tqdm", RecordingBar)
    real_step = loop_module.TrainingLoop.train_step

    def failing_third_step(self):
        if self.state.step == 2:
            raise RuntimeError("out of memory in this test")
        return real_step(self)

    monkeypatch.setattr(loop_module.TrainingLoop, "train_step", failing_third_step)
    with pytest.raises(RuntimeError, match="out of memory in this test"):
        train(cfg, tmp_path / "run")
    assert [step for step, _ in RecordingBar.drawn] == [1, 2, "closed"]
    # The run's record says it failed, and with what: not "interrupted", which resume would be the answer to.
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["status"], summary["error"], summary["final_step"]) == (
        "failed", "RuntimeError: out of memory in this test", 2)
