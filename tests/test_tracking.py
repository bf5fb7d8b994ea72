import builtins
import json
import logging
import socket
import time

import pytest
import torch

from trainer.config.schema import TrackingConfig
from trainer.tracking import Tracker


@pytest.fixture
def wandb_sandbox(tmp_path, monkeypatch):
    """Keep wandb's files, settings and credentials inside the test's directory."""
    home = tmp_path / "wandb-home"
    for var, sub in (("WANDB_DIR", "dir"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_DATA_DIR", "data")):
        (home / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_RUN_ID", "WANDB_RESUME", "HTTP_PROXY", "HTTPS_PROXY",
                "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    return home


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_disabled_never_imports_wandb(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def guarded_import(name, *args, **kwargs):
        if name == "wandb" or name.startswith("wandb."):
            raise AssertionError("wandb imported although tracking.wandb_mode=disabled")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded_import)
    tracker = Tracker(tmp_path, TrackingConfig(wandb_mode="disabled"), "run", {"a": 1})
    tracker.log({"train/loss": torch.tensor(2.0), "lr": 1e-3}, step=1)
    tracker.write_summary({"final_step": 1})
    tracker.close()

    assert tracker.wandb_mode == "disabled"
    [record] = _records(tmp_path)
    assert record["step"] == 1 and record["train/loss"] == 2.0 and record["lr"] == 1e-3
    assert isinstance(record["time"], float)
    assert json.loads((tmp_path / "summary.json").read_text()) == {"final_step": 1}
    assert not (tmp_path / "wandb_run_id.txt").exists()


def test_non_zero_rank_does_nothing(tmp_path):
    tracker = Tracker(tmp_path / "run", TrackingConfig(wandb_mode="offline"), "run", {}, enabled=False)
    tracker.log({"loss": 1.0}, step=1)
    tracker.write_summary({"x": 1})
    tracker.close()
    assert tracker.wandb_mode == "disabled"
    assert not (tmp_path / "run").exists()


def test_offline_mode_writes_local_files_quickly(tmp_path, wandb_sandbox):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    tracker = Tracker(run_dir, TrackingConfig(wandb_mode="offline"), "offline-run", {"optim": {"lr": 0.1}})
    assert tracker.wandb_mode == "offline"
    for step in (1, 2, 3):
        tracker.log({"train/loss": 3.0 - step, "note": "warmup"}, step=step)
    tracker.write_summary({"best_eval_loss": torch.tensor(0.5)})
    tracker.close()
    assert time.monotonic() - started < 10

    assert [r["step"] for r in _records(run_dir)] == [1, 2, 3]
    assert _records(run_dir)[0]["note"] == "warmup"
    assert json.loads((run_dir / "summary.json").read_text()) == {"best_eval_loss": 0.5}
    assert (run_dir / "wandb_run_id.txt").read_text().strip()
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_a_sweep_job_is_named_by_its_directory_and_grouped_by_its_sweep(tmp_path, wandb_sandbox, caplog):
    with caplog.at_level(logging.INFO, logger="trainer.tracking"):
        tracker = Tracker(tmp_path / "1_moe-main", TrackingConfig(wandb_mode="offline"), "1_moe-main", {},
                          group="2026-11-21_10-00-00")
    try:
        assert (tracker._run.name, tracker._run.group) == ("1_moe-main", "2026-11-21_10-00-00")
        assert "W&B offline run '1_moe-main' in group '2026-11-21_10-00-00'" in caplog.text
    finally:
        tracker.close()


def test_online_unreachable_host_falls_back_to_offline(tmp_path, wandb_sandbox, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    cfg = TrackingConfig(wandb_mode="online", online_timeout_s=5.0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="trainer.tracking"):
        tracker = Tracker(tmp_path, cfg, "online-run", {})
    elapsed = time.monotonic() - started
    tracker.log({"loss": 1.0}, step=1)
    tracker.close()

    assert tracker.wandb_mode == "offline"
    assert elapsed < cfg.online_timeout_s + 3
    assert "127.0.0.1:9" in caplog.text and "offline" in caplog.text


def test_online_silent_server_is_bounded_by_timeout(tmp_path, wandb_sandbox, monkeypatch):
    # Accepts TCP connections (the kernel completes the handshake) but never answers HTTP.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    cfg = TrackingConfig(wandb_mode="online", online_timeout_s=6.0)
    try:
        started = time.monotonic()
        tracker = Tracker(tmp_path, cfg, "hung-server", {})
        elapsed = time.monotonic() - started
        run_id = tracker._run.id
        tracker.close()
    finally:
        server.close()
    assert tracker.wandb_mode == "offline"
    assert elapsed < cfg.online_timeout_s + 3
    # The offline fallback keeps the run id, so a later `wandb sync` continues the same W&B run.
    assert run_id == (tmp_path / "wandb_run_id.txt").read_text().strip()


def test_wandb_init_failure_leaves_metrics_working(tmp_path, wandb_sandbox, monkeypatch, caplog):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("wandb service crashed")

    monkeypatch.setattr(wandb, "init", broken_init)
    with caplog.at_level(logging.WARNING, logger="trainer.tracking"):
        tracker = Tracker(tmp_path, TrackingConfig(wandb_mode="offline"), "run", {})
    tracker.log({"loss": 1.5}, step=1)
    tracker.close()
    assert tracker.wandb_mode == "unavailable"
    assert "wandb service crashed" in caplog.text
    assert _records(tmp_path)[0]["loss"] == 1.5


def test_wandb_log_errors_are_swallowed_and_reported_once(tmp_path, caplog):
    class ExplodingRun:
        def log(self, *args, **kwargs):
            raise ConnectionError("socket closed")

        def finish(self):
            pass

    tracker = Tracker(tmp_path, TrackingConfig(wandb_mode="disabled"), "run", {})
    tracker._adopt(ExplodingRun())
    with caplog.at_level(logging.WARNING, logger="trainer.tracking"):
        for step in range(3):
            tracker.log({"loss": 1.0}, step=step)
    tracker.close()
    assert caplog.text.count("socket closed") == 1
    assert len(_records(tmp_path)) == 3


def test_resume_step_trims_later_lines_and_appends(tmp_path):
    lines = [json.dumps({"step": s, "time": 0.0, "loss": float(s)}) for s in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 11, "ti')  # torn by a crash
    (tmp_path / "wandb_run_id.txt").write_text("abc123\n")

    tracker = Tracker(tmp_path, TrackingConfig(wandb_mode="disabled"), "run", {}, resume_step=5)
    tracker.log({"loss": 6.5}, step=6)
    tracker.close()
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert _records(tmp_path)[-1]["loss"] == 6.5


def test_resume_reuses_wandb_run_id(tmp_path, wandb_sandbox):
    (tmp_path / "wandb_run_id.txt").write_text("abc123\n")
    tracker = Tracker(tmp_path, TrackingConfig(wandb_mode="offline"), "run", {}, resume_step=0)
    run_id = tracker._run.id
    tracker.close()
    assert run_id == "abc123"

    fresh = Tracker(tmp_path, TrackingConfig(wandb_mode="offline"), "run", {})
    fresh.close()
    assert (tmp_path / "wandb_run_id.txt").read_text().strip() != "abc123"
    assert list(tmp_path.glob("metrics.jsonl.replaced-*")) == []  # nothing had been logged yet


def test_auto_mode_goes_online_only_for_users_who_set_wandb_up(monkeypatch, tmp_path):
    from trainer.tracking import resolve_wandb_mode

    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert resolve_wandb_mode("auto") == "offline"
    assert resolve_wandb_mode("online") == "online" and resolve_wandb_mode("disabled") == "disabled"

    netrc_file = tmp_path / ".netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    assert resolve_wandb_mode("auto") == "online", "`wandb login` writes a netrc entry"
    netrc_file.unlink()

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled", "an explicit WANDB_MODE wins in auto"
