"""SIGTERM (pre-emption) and Ctrl-C stop a run at an update boundary with a checkpoint it resumes from exactly."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import assert_ok, start_tiny_run, tiny_run
from tests.test_train_e2e import assert_same_weights, metrics
from trainer.stop_signals import StopSignals

# Handlers can only be installed from the main thread; elsewhere the os.kill calls below would end pytest.
in_main_thread = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                    reason="signal handlers need the main thread")


@in_main_thread
def test_first_signal_only_raises_the_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGTERM)  # the default handler would end the test process here
        assert stop.received == "SIGTERM" and stop.exit_code == 143
        os.kill(os.getpid(), signal.SIGTERM)  # SLURM and torchrun both signal a worker: still just stopping
        assert stop.received == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C means "now"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@in_main_thread
def test_ctrl_c_alone_reports_its_own_exit_code():
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGINT" and stop.exit_code == 130
    assert StopSignals().exit_code == 143  # told by another process: SIGTERM's code


def wait_for_training(run_dir: Path, process, min_step: int = 3, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(row.get("step", 0) >= min_step and "train/loss" in row
                                 for row in map(json.loads, path.read_text().splitlines()[:-1])):
            return
        time.sleep(0.05)
    raise AssertionError(f"{run_dir} did not reach step {min_step} in {timeout}s")


STEPS = ["train.max_steps=40", "train.eval_every=10", "checkpoint.save_every=1000", "train.log_every=1",
         "optim.learning_rate=1e-3", "model.dropout=0.1"]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_finishes_like_an_uninterrupted_run(tmp_path, data_cache):
    """As a pre-empted sweep job: the report says interrupted, and the re-launched sweep's report, completed."""
    assert_ok(tiny_run(tmp_path, data_cache, *STEPS, name="whole"))
    sweep = ["--multirun", "hydra.sweep.dir=sweep"]
    cut = tmp_path / "sweep" / "0_cut"
    process = start_tiny_run(tmp_path, data_cache, *sweep, *STEPS, name="cut")
    wait_for_training(cut, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)

    assert process.returncode == 143, stderr[-3000:]
    summary = json.loads((cut / "summary.json").read_text())
    stopped_at = summary["final_step"]
    assert summary["status"] == "interrupted" and 3 <= stopped_at < 40, summary
    assert summary["stop_reason"] == f"SIGTERM at step {stopped_at}: checkpoint saved, continue with run.resume=auto"
    assert "interrupted at step" in stdout and "Traceback" not in stderr
    assert (cut / f"ckpt-step-{stopped_at}.pt").exists()  # save_every=1000: only the signal saved it
    assert not (cut / "final-model.safetensors").exists()  # an unfinished run has no final model
    report = (tmp_path / "sweep" / "report.md").read_text()
    assert f"| interrupted: SIGTERM at step {stopped_at}: checkpoint saved" in report, "written as the sweep exits"

    assert_ok(tiny_run(tmp_path, data_cache, *sweep, *STEPS, "run.resume=auto", name="cut"))
    assert_same_weights(tmp_path / "whole" / "final-model.safetensors", cut / "final-model.safetensors")
    # Dropout, the data position and the due evals all carried over: every logged number is the same.
    drop_timing = {"time", "train/tokens_per_sec"}
    assert ([{k: v for k, v in row.items() if k not in drop_timing} for row in metrics(cut)]
            == [{k: v for k, v in row.items() if k not in drop_timing} for row in metrics(tmp_path / "whole")])
    resumed = json.loads((cut / "summary.json").read_text())
    assert resumed["status"] == "completed"
    assert resumed["wall_time_s"] > resumed["this_launch_s"], "the time before the cut is counted"
    assert "| completed | 40 |" in (tmp_path / "sweep" / "report.md").read_text(), "the re-launch rewrote it"


def test_an_interrupt_nothing_else_handled_ends_in_one_line_and_130(monkeypatch, capsys):
    # Tokenizing, preparing data, or a second Ctrl-C while training: KeyboardInterrupt reaches the entrypoint.
    import trainer.run as entrypoint

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(entrypoint, "main", interrupted)
    assert entrypoint.cli() == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted (Ctrl-C)") and "run.resume=auto" in lines[0]
