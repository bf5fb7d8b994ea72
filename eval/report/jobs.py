"""The runs a report compares: found in sweep directories or given one by one, each read from what its directory
recorded (Hydra's .hydra/, resolved_config.yaml, summary.json, failure.json, metrics.jsonl), never from W&B."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from models.report import RunRecord
from trainer.base.errors import UserError
from trainer.config.validate import RECORDED_CONFIG
from trainer.job import FAILURE_FILE
from trainer.tracking import METRICS_FILE, SUMMARY_FILE, read_metrics

HYDRA_DIR = ".hydra"
RUN_MARKERS = (HYDRA_DIR, SUMMARY_FILE, METRICS_FILE, RECORDED_CONFIG)
KILLED = "no summary.json: the process was killed (kill -9, out of memory) or is still running"


@dataclass
class Job:
    name: str  # how the report names it: the job's directory, relative to what the compared runs share
    path: Path
    overrides: dict[str, str] = field(default_factory=dict)  # the command-line overrides it was launched with
    config: dict[str, Any] = field(default_factory=dict)  # resolved_config.yaml (or Hydra's composed config)
    summary: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None  # a sweep job that raised: trainer/job.py's record
    record: RunRecord = field(default_factory=RunRecord)

    @property
    def family(self) -> str | None:
        return (self.summary or {}).get("mode") or self.config.get("model", {}).get("family")

    @property
    def status(self) -> str:
        """completed, stopped_early, interrupted, failed or refused (launched, then refused by a check)."""
        if self.failure is not None:
            return self.failure["status"]
        if self.summary is not None:
            return self.summary["status"]
        return "interrupted"

    @property
    def why(self) -> str | None:
        """The one line that says why a job did not complete: its error, or why it stopped."""
        if self.failure is not None:
            return self.failure.get("error")
        if self.summary is not None:
            return self.summary.get("error") or self.summary.get("stop_reason")
        return KILLED


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in RUN_MARKERS)


def _job_order(path: Path) -> tuple[int, str]:
    # Hydra names a sweep's jobs <number>_<name>: job 10 after job 9, not after job 1.
    number = re.match(r"(\d+)_", path.name)
    return (int(number.group(1)) if number else 1 << 30, path.name)


def sweep_jobs(sweep_dir: Path) -> list[Path]:
    return sorted((child for child in sweep_dir.iterdir() if is_run_dir(child)), key=_job_order)


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories, in order: a sweep directory stands for its jobs, in job order."""
    runs: list[Path] = []
    for path in paths:
        if is_run_dir(path):
            runs.append(path)
        elif path.is_dir() and (jobs := sweep_jobs(path)):
            runs.extend(jobs)
        else:
            raise UserError(f"{path} is neither a run directory (one written by trainer/run.py, with "
                            f"{SUMMARY_FILE} or {HYDRA_DIR}/) nor a sweep directory holding such runs "
                            "(outputs/multirun/<date>_<time>)")
    if len({run.resolve() for run in runs}) != len(runs):
        raise UserError("the same run is given twice; name each run or sweep directory once")
    return runs


def parse_overrides(lines: list[str]) -> dict[str, str]:
    """{key: value} from Hydra override strings: `a.b=1`, `+a.b=1`, `++a.b=1`, `~a.b` (deleted)."""
    parsed = {}
    for line in lines:
        if line.startswith("~"):
            parsed[line[1:].split("=", 1)[0]] = "(deleted)"
            continue
        key, _, value = line.lstrip("+").partition("=")
        parsed[key] = value
    return parsed


def _read_json(path: Path) -> dict | None:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent, or not JSON (written by hand, or by a version before atomic writes): not written
    return loaded if isinstance(loaded, dict) else None


def _read_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config a training run records; a job refused before that, Hydra's composed config."""
    for path in (run_dir / RECORDED_CONFIG, run_dir / HYDRA_DIR / "config.yaml"):
        if path.is_file():
            try:
                return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            except Exception:  # unreadable YAML (a hand-edited file): the next record, else no config
                continue
    return {}


def read_job(path: Path, name: str) -> Job:
    overrides_file = path / HYDRA_DIR / "overrides.yaml"
    overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
    config = _read_config(path)
    return Job(name=name, path=path, overrides=parse_overrides([str(o) for o in overrides or []]), config=config,
               summary=_read_json(path / SUMMARY_FILE), failure=_read_json(path / FAILURE_FILE),
               record=RunRecord(model_config=config.get("model") or {}, rows=read_metrics(path)))


def read_jobs(paths: list[Path]) -> list[Job]:
    """The runs `paths` name (run or sweep directories), named by their paths below what they share."""
    runs = find_runs(paths)
    resolved = [run.resolve() for run in runs]
    common = Path(os.path.commonpath(resolved)) if len(resolved) > 1 else resolved[0].parent
    jobs = [read_job(run, str(path.relative_to(common))) for run, path in zip(runs, resolved, strict=True)]
    return [job for job in jobs if job.config.get("run", {}).get("task", "train") == "train"]
