"""What the checkpoint files of a run directory are called, and listing, pruning and sweeping them.

Every name is spelled here once: the full checkpoint `ckpt-step-N.pt`, DeepSpeed's native state beside it
`ckpt-step-N.deepspeed/` (written as `ckpt-step-N.deepspeed.tmp/` and renamed into place whole), and the
model-only snapshots `model-step-N`, `best-model` and `final-model` (each a `.safetensors` and a `.json`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from trainer.base.atomic_files import fsync_directory, remove_temporaries

log = logging.getLogger(__name__)

_FULL = "ckpt-step-{step}.pt"
_DEEPSPEED = "ckpt-step-{step}.deepspeed"
_STAGING = _DEEPSPEED + ".tmp"
_MODEL_STEP = "model-step-{step}"

# Snapshot stems that are not a step's: the lowest eval loss so far, and the model at the end of the run.
BEST_MODEL = "best-model"
FINAL_MODEL = "final-model"
WEIGHTS_SUFFIX = ".safetensors"
SIDECAR_SUFFIX = ".json"


def _pattern(template: str) -> re.Pattern:
    """A name template as a regex whose group 1 is the step."""
    return re.compile("^" + re.escape(template).replace(re.escape("{step}"), r"(\d+)") + "$")


_FULL_PATTERN = _pattern(_FULL)
_STAGING_PATTERN = _pattern(_STAGING)
_SNAPSHOT_PATTERN = _pattern(_MODEL_STEP + WEIGHTS_SUFFIX)


# --------------------------------------------------------------------------- names


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / _FULL.format(step=int(step))


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a `ckpt-step-N.pt` path; None for any other name."""
    match = _FULL_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


def deepspeed_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """DeepSpeed's own sharded state of the checkpoint at `step`, next to its .pt."""
    return Path(run_dir) / _DEEPSPEED.format(step=int(step))


def deepspeed_staging_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where every rank writes DeepSpeed's state before it is renamed to deepspeed_dir; a killed save's leftover
    is removed by remove_stale_temporaries."""
    return Path(run_dir) / _STAGING.format(step=int(step))


def model_step_stem(step: int) -> str:
    return _MODEL_STEP.format(step=int(step))


def snapshot_paths(run_dir: str | os.PathLike, stem: str) -> tuple[Path, Path]:
    """(weights, sidecar) of the snapshot `stem`."""
    base = Path(run_dir) / stem
    return base.with_name(f"{stem}{WEIGHTS_SUFFIX}"), base.with_name(f"{stem}{SIDECAR_SUFFIX}")


# --------------------------------------------------------------------------- listing


def _files_by_step(run_dir: str | os.PathLike, pattern: re.Pattern) -> list[tuple[int, Path]]:
    """(step, path) of the files in run_dir whose name `pattern` matches (group 1: the step), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for entry in run_dir.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def list_full_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every ckpt-step-N.pt in run_dir, in step order (numeric, not by name)."""
    return _files_by_step(run_dir, _FULL_PATTERN)


def list_model_snapshots(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, weights path) of every model-step-N snapshot in run_dir, in step order."""
    return _files_by_step(run_dir, _SNAPSHOT_PATTERN)


# --------------------------------------------------------------------------- pruning


def prune_full_checkpoints(run_dir: str | os.PathLike, keep_last_k: int) -> list[Path]:
    """Delete all but the newest `keep_last_k` ckpt-step-*.pt, each with the engine-native state beside it
    (ckpt-step-N.deepspeed/); model snapshots and best/final models are kept."""
    if keep_last_k < 1:
        raise ValueError(f"keep_last_k must be >= 1, got {keep_last_k}")
    checkpoints = list_full_checkpoints(run_dir)
    doomed = [path for _, path in checkpoints[:-keep_last_k]]
    remove_full_checkpoints(doomed)
    return doomed


def remove_full_checkpoints(paths: list[Path]) -> None:
    """Delete these ckpt-step-N.pt files, each with the engine-native state beside it (ckpt-step-N.deepspeed/)."""
    for path in paths:
        path.unlink(missing_ok=True)
        step = checkpoint_step(path)
        if step is not None:
            shutil.rmtree(deepspeed_dir(path.parent, step), ignore_errors=True)
    for directory in {path.parent for path in paths}:
        fsync_directory(directory)


def prune_model_snapshots(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` model-step-N snapshots (weights and sidecar); best-model and
    final-model are other names and always stay."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    doomed = [path for _, path in list_model_snapshots(run_dir)[:-keep_last]]
    for path in doomed:  # sidecar first: if interrupted, the weights left behind still match and go next time
        path.with_suffix(SIDECAR_SUFFIX).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    if doomed:
        fsync_directory(Path(run_dir))
    return doomed


# --------------------------------------------------------------------------- what killed saves leave


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete what saves killed mid-write left in `run_dir`; returns what was removed.

    Those are atomic_path's hidden temporaries (trainer.base.atomic_files) and DeepSpeed's staging directories.
    A half-written checkpoint of a large model is gigabytes nobody will ever read. Call it once at the start
    of a run, before anything saves, from one process only.
    """
    directory = Path(run_dir)
    removed = remove_temporaries(directory)
    if directory.is_dir():
        for entry in sorted(directory.iterdir()):
            if entry.is_dir() and not entry.is_symlink() and _STAGING_PATTERN.match(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    if removed:
        log.warning("removed %d partial file(s) left in %s by an interrupted save: %s", len(removed), directory,
                    ", ".join(path.name for path in sorted(removed)))
    return sorted(removed)
