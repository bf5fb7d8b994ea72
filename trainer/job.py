"""One Hydra job: validate the composed config, then train (or tokenize); each saves it resolved next to the run."""

from __future__ import annotations

import gc
import os
import shutil
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from trainer.base.atomic_files import atomic_write_bytes
from trainer.base.json_files import to_json_bytes
from trainer.config.validate import RECORDED_CONFIG, record_config, validate


def run_job(cfg: DictConfig) -> dict:
    config = validate(cfg)  # before any torch import: user mistakes cost nothing
    hydra = HydraConfig.get()
    run_dir = Path(hydra.runtime.output_dir)
    is_main = int(os.environ.get("RANK", 0)) == 0  # under torchrun, one process writes and reports
    if config.run.task == "tokenize":
        from data.shards.tokenize import tokenize_data

        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            record_config(config, run_dir)
        return {"task": "tokenize", "domains": tokenize_data(config.data)}

    from trainer.fit import describe_outputs, train

    # train() writes resolved_config.yaml itself, once it has accepted the run directory: a refused resume
    # must not overwrite the record of the run whose checkpoints are there.
    # A sweep's jobs share run.name (the preset): on W&B they are told apart by directory and grouped by sweep.
    sweep = Path(hydra.sweep.dir).name if hydra.mode == RunMode.MULTIRUN else None
    summary = train(config, run_dir, sweep=sweep)
    # The run's objects are garbage now, some of it cyclic (ZeRO hangs its process group on every parameter).
    # Collect it here, while the interpreter is whole: left to shutdown, a process group's gloo threads are
    # torn down during interpreter finalization, a known source of aborts at exit after a finished run.
    gc.collect()
    if is_main:
        print(describe_outputs(summary), flush=True)
    if "exit_code" in summary:
        # Stopped by SIGTERM/Ctrl-C with a checkpoint: exit as a shell reports that signal (143, 130), so a
        # job script or a --multirun sweep sees the run is unfinished and does not go on as if it were.
        raise SystemExit(summary["exit_code"])
    return summary


# A sweep job that raised (refused or failed) says so here, for the sweep report: {"status", "error"}.
FAILURE_FILE = "failure.json"


def record_failure(run_dir: Path, status: str, error: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / FAILURE_FILE, to_json_bytes({"status": status, "error": error}))


def clear_failure(run_dir: Path) -> None:
    (run_dir / FAILURE_FILE).unlink(missing_ok=True)


# What one launch puts in its run directory before it trains: Hydra's record of the launch, Hydra's log file,
# and (once train() accepts the directory) the resolved config. Nothing a user would want back from a refusal.
LAUNCH_BOOKKEEPING = (".hydra", "run.log", RECORDED_CONFIG, FAILURE_FILE)


def holds_no_earlier_run(run_dir: Path) -> bool:
    """True when run_dir holds only this launch's bookkeeping and an empty log: no run lived here before.

    Hydra creates the directory, its .hydra/ and run.log before the job starts, so checking for existence
    cannot tell a new directory from an old one; an empty log can (every run logs to it).
    """
    log_file = run_dir / "run.log"
    empty_log = not log_file.exists() or log_file.stat().st_size == 0
    return empty_log and _only_bookkeeping(run_dir)


def discard_refused_launch(run_dir: Path, output_dir: Path | None = None) -> None:
    """Remove what a refused launch created, so a mistyped override leaves no run directory behind, nor the
    empty folders Hydra made for it below `output_dir` (task=tokenize's `outputs/tokenize/`).

    Called only when holds_no_earlier_run() held at the start; checked again here so that anything written
    since (a checkpoint, metrics, a tokenizer) keeps the directory.
    """
    if not _only_bookkeeping(run_dir):
        return
    for name in LAUNCH_BOOKKEEPING:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    try:
        run_dir.rmdir()
    except OSError:
        return  # something else appeared meanwhile: leave it
    if output_dir is None:
        return
    stop = output_dir.resolve()
    for parent in run_dir.resolve().parents:
        if parent == stop or stop not in parent.parents:
            break
        try:
            parent.rmdir()  # only an empty folder goes
        except OSError:
            break


def _only_bookkeeping(run_dir: Path) -> bool:
    return run_dir.is_dir() and all(entry.name in LAUNCH_BOOKKEEPING for entry in run_dir.iterdir())
