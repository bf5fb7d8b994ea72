"""Full resume checkpoints (`ckpt-step-N.pt`): the payload's required keys, atomic save, safe load, and the
checks that refuse, in one line, a file this run cannot resume from.

The file is written under a temporary name and renamed into place, so a crash, a full disk or a pre-empted
node never leaves a torn file under a name that resume would trust. It is read with `weights_only=True`: it
may only hold tensors and plain Python values, which save checks up front.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from models.registry import config_schemas
from trainer.base.atomic_files import atomic_path
from trainer.base.errors import UserError, one_line
from trainer.checkpoint.files import checkpoint_path, list_full_checkpoints
from trainer.config.explain import as_override

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of full checkpoints and snapshot sidecars alike

REQUIRED_KEYS = (
    "format_version",
    "step",
    "preset",
    "mode",
    "model_state_dict",
    "optimizer_state_dict",
    "scheduler_state_dict",
    "config",
    "python_random_state",
    "numpy_random_state",
    "torch_rng_state",
    "cuda_rng_state_if_available",
)

# What torch.load(weights_only=True) accepts; anything else is caught at save time, not at resume time.
_SAFE_LEAF_TYPES = (str, bytes, int, float, bool, complex, type(None), torch.Size, torch.dtype, torch.device)


def _find_unsafe_value(obj: Any, where: str) -> str | None:
    # Exact container types: weights_only refuses subclasses such as defaultdict and namedtuples.
    if isinstance(obj, (torch.Tensor, *_SAFE_LEAF_TYPES)):
        return None
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            if not isinstance(key, _SAFE_LEAF_TYPES):
                return f"{where} has a key of type {type(key).__name__}"
            found = _find_unsafe_value(value, f"{where}[{key!r}]")
            if found:
                return found
        return None
    if type(obj) in (list, tuple, set):
        for index, value in enumerate(obj):
            found = _find_unsafe_value(value, f"{where}[{index}]")
            if found:
                return found
        return None
    return f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}"


def save_full_checkpoint(run_dir: str | os.PathLike, step: int, payload: dict[str, Any]) -> Path:
    """Write `ckpt-step-<step>.pt` atomically. `payload` must already hold every REQUIRED_KEYS entry."""
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks required keys: {', '.join(missing)}")
    if payload["format_version"] != FORMAT_VERSION:
        raise ValueError(f"checkpoint payload has format_version={payload['format_version']!r}; "
                         f"this module writes {FORMAT_VERSION}")
    if int(payload["step"]) != int(step):
        raise ValueError(f"checkpoint payload says step={payload['step']} but is being saved as step {step}")
    # A numpy array or custom object would save fine and only fail hours later, at resume.
    unsafe = _find_unsafe_value(payload, "payload")
    if unsafe:
        raise ValueError(f"{unsafe}, which torch.load(weights_only=True) refuses; "
                         "convert it to a tensor or a plain Python value")
    path = checkpoint_path(run_dir, step)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _read_checkpoint(path: Path, mmap: bool = False) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def normalise(value: Any) -> Any:
    """A value as compared with what was saved: torch.save keeps tuples as tuples while configs arrive as
    lists, so both become lists."""
    if isinstance(value, dict):
        return {key: normalise(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalise(item) for item in value]
    return value


class _Absent:
    def __repr__(self) -> str:
        return "<not set>"


_ABSENT = _Absent()


def _show(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def _override_for(name: str, value: Any) -> str:
    """The command-line override that gives this run the checkpoint's value of an identity key."""
    field = name.removeprefix("architecture.")
    if name == "mode" or field == "family":
        return f"model={value}"
    if field == "vocab_size":
        return f"the tokenizer it was trained with (vocab size {value}; data.tokenizer)"
    if any(field in {f.name for f in fields(schema)} for schema in config_schemas().values()):
        return f"model.{field}={as_override(value)}"
    return f"the checkpoint's {field}={_show(value)}"


def _first_difference(saved: Any, current: Any, key: str) -> tuple[str, Any, Any] | None:
    if isinstance(saved, dict) and isinstance(current, dict):
        for sub in sorted(set(saved) | set(current), key=str):
            found = _first_difference(saved.get(sub, _ABSENT), current.get(sub, _ABSENT), f"{key}.{sub}")
            if found:
                return found
        return None
    if isinstance(saved, float) and isinstance(current, float) and math.isnan(saved) and math.isnan(current):
        return None
    return None if saved == current else (key, saved, current)


def load_full_checkpoint(path: str | os.PathLike, expected: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a full checkpoint on CPU, refusing (UserError) anything this run cannot resume from.

    `expected` maps top-level keys (e.g. "mode", "architecture") to this run's values; nested dicts
    are compared key by key so the message names the exact field that differs.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"resume path {path} is a directory; pass one of its ckpt-step-<n>.pt files "
                        "or run.resume=auto")
    if not path.exists():
        raise UserError(f"resume checkpoint {path} does not exist; pass an existing ckpt-step-<n>.pt "
                        "or run.resume=auto to pick the newest checkpoint of this run")
    try:
        payload = _read_checkpoint(path)
    except Exception as err:
        raise UserError(f"{path} is not a readable checkpoint of this trainer ({one_line(err)}); "
                        "pass a ckpt-step-<n>.pt written by this trainer") from err
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise UserError(f"{path} is not a checkpoint of this trainer (no format_version); "
                        "pass a ckpt-step-<n>.pt written by this trainer")
    found_version = payload["format_version"]
    if found_version != FORMAT_VERSION:
        raise UserError(f"checkpoint {path.name} has format_version={found_version!r} but this trainer reads "
                        f"format_version={FORMAT_VERSION}; resume it with the trainer version that wrote it "
                        "or start a fresh run")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise UserError(f"checkpoint {path.name} lacks required keys ({', '.join(missing)}); "
                        "it was not written by this trainer; start a fresh run")
    for key, current in (expected or {}).items():
        difference = _first_difference(normalise(payload.get(key, _ABSENT)), normalise(current), key)
        if difference:
            name, saved_value, run_value = difference
            if saved_value is _ABSENT:
                raise UserError(f"checkpoint {path.name} records no {name} but this run has "
                                f"{name}={_show(run_value)}; it cannot be checked for compatibility, "
                                "so start a fresh run")
            raise UserError(f"checkpoint {path.name} was trained with {name}={_show(saved_value)} but this run "
                            f"is {name}={_show(run_value)}; resume it with {_override_for(name, saved_value)}, "
                            "or start a fresh run with another run.name")
    return payload


def find_latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """Newest checkpoint that opens; an unreadable newer one is skipped (with a warning), not fatal.

    The probe memory-maps the file, so it reads the archive index and pickle but not the tensor data;
    a truncated archive loses its index (stored at the end) and is caught here. Format-version and
    compatibility checks are left to load_full_checkpoint, so a checkpoint from another trainer version
    is reported to the user rather than silently skipped.
    """
    for _step, path in reversed(list_full_checkpoints(run_dir)):
        try:
            payload = _read_checkpoint(path, mmap=True)
        # A damaged pickle fails with almost any exception type (KeyError, IndexError, EOFError, ...).
        except Exception as err:
            log.warning("skipping unreadable checkpoint %s (%s); trying an older one", path, one_line(err))
            continue
        if not isinstance(payload, dict) or "format_version" not in payload:
            log.warning("skipping %s: not a checkpoint of this trainer; trying an older one", path)
            continue
        return path
    return None


def rng_states_by_rank(checkpoint: dict[str, Any]) -> list[dict]:
    """The RNG state each process saved, in rank order; its length is the world size that wrote the
    checkpoint (a single-process checkpoint holds its one state at the top level)."""
    return checkpoint.get("rng_states_by_rank") or [checkpoint]


def opens(path: Path) -> bool:
    """Whether the file opens as a torch archive at all; a save cut short does not. Memory-mapped: no tensor
    data is read."""
    try:
        _read_checkpoint(path, mmap=True)
    except Exception:  # a damaged archive fails with almost any exception type
        return False
    return True

