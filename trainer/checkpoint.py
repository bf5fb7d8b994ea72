"""Run-directory artifacts: full resume checkpoints (.pt) and model-only snapshots (.safetensors + .json).

Every file is written under a temporary name and renamed into place, so a crash, a full disk or a
pre-empted node never leaves a torn file under a name that resume or evaluation would trust.
Full checkpoints are read with `weights_only=True`: they may only hold tensors and plain Python values.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections import OrderedDict
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from models.registry import config_schemas
from trainer.base.atomic_files import atomic_path, atomic_write_bytes, fsync_directory, remove_temporaries
from trainer.base.errors import UserError
from trainer.base.json_files import to_json_bytes
from trainer.config.explain import as_override

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

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

SIDECAR_REQUIRED_KEYS = ("format_version", "step", "preset", "mode", "config", "metrics_summary")

_CKPT_PATTERN = re.compile(r"^ckpt-step-(\d+)\.pt$")
# Snapshot metadata travels inside the safetensors header too, so weights and metadata cannot drift
# apart even if a crash lands between writing the .safetensors file and its .json sidecar.
_ST_METADATA_KEY = "trainer_metadata"
_ST_ALIASES_KEY = "trainer_aliases"

# What torch.load(weights_only=True) accepts; anything else is caught at save time, not at resume time.
_SAFE_LEAF_TYPES = (str, bytes, int, float, bool, complex, type(None), torch.Size, torch.dtype, torch.device)


# atomic_path's temporaries are swept by trainer.base.atomic_files; this is the DeepSpeed engine's staging
# directory (trainer/engines/deepspeed.py: `staging_dir`), renamed into place once every rank has written.
_STAGING_DIR = re.compile(r"^ckpt-step-\d+\.deepspeed\.tmp$")


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete what saves killed mid-write left in `run_dir`; returns what was removed.

    A half-written checkpoint of a large model is gigabytes nobody will ever read. Call it once at the
    start of a run, before anything saves, from one process only.
    """
    directory = Path(run_dir)
    removed = remove_temporaries(directory)
    if directory.is_dir():
        for entry in sorted(directory.iterdir()):
            if entry.is_dir() and not entry.is_symlink() and _STAGING_DIR.match(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    if removed:
        log.warning("removed %d partial file(s) left in %s by an interrupted save: %s", len(removed), directory,
                    ", ".join(path.name for path in sorted(removed)))
    return sorted(removed)


# --------------------------------------------------------------------------- full checkpoints


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / f"ckpt-step-{int(step)}.pt"


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


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _read_checkpoint(path: Path, mmap: bool = False) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _normalise(value: Any) -> Any:
    # torch.save keeps tuples as tuples while configs arrive as lists; compare them as equal.
    if isinstance(value, dict):
        return {key: _normalise(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(item) for item in value]
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
        raise UserError(f"{path} is not a readable checkpoint of this trainer ({_one_line(err)}); "
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
        difference = _first_difference(_normalise(payload.get(key, _ABSENT)), _normalise(current), key)
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
    return _files_by_step(run_dir, _CKPT_PATTERN)


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
            log.warning("skipping unreadable checkpoint %s (%s); trying an older one", path, _one_line(err))
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
        shutil.rmtree(path.with_suffix(".deepspeed"), ignore_errors=True)
    for directory in {path.parent for path in paths}:
        fsync_directory(directory)


_SNAPSHOT_PATTERN = re.compile(r"^model-step-(\d+)\.safetensors$")


def prune_model_snapshots(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` model-step-N snapshots (weights and sidecar); best-model and
    final-model are other names and always stay."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    doomed = [path for _, path in _files_by_step(run_dir, _SNAPSHOT_PATTERN)[:-keep_last]]
    for path in doomed:  # sidecar first: if interrupted, the weights left behind still match and go next time
        path.with_suffix(".json").unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    if doomed:
        fsync_directory(Path(run_dir))
    return doomed


# --------------------------------------------------------------------------- model-only snapshots


def _dedupe_shared_tensors(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state dict into tensors safetensors can store and an alias map {alias: stored name}.

    safetensors refuses tensors that share memory. Exact aliases (tied weights such as GPT-2's wte and
    lm_head) are stored once and re-linked on load; overlapping-but-different views are copied apart.
    """
    groups: dict[tuple, list[str]] = {}
    for name, tensor in state_dict.items():
        if tensor.numel() == 0:
            groups[("empty", name)] = [name]
            continue
        storage_key = (tensor.device, tensor.untyped_storage().data_ptr())
        groups.setdefault(storage_key, []).append(name)

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for names in groups.values():
        views: dict[tuple, str] = {}
        for name in names:
            tensor = state_dict[name]
            view_key = (tensor.dtype, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
            if view_key in views:
                aliases[name] = views[view_key]
            else:
                views[view_key] = name
        owners = list(views.values())
        for name in owners:
            tensor = state_dict[name].detach().cpu()
            if len(owners) > 1:
                tensor = tensor.clone(memory_format=torch.contiguous_format)
            tensors[name] = tensor.contiguous()
    return tensors, aliases


def snapshot_paths(run_dir: str | os.PathLike, stem: str) -> tuple[Path, Path]:
    base = Path(run_dir) / stem
    return base.with_name(f"{stem}.safetensors"), base.with_name(f"{stem}.json")


def save_model_snapshot(
    run_dir: str | os.PathLike, stem: str, model_state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]
) -> Path:
    """Write `<stem>.safetensors` (weights) and `<stem>.json` (metadata); returns the .safetensors path.

    `metadata` must hold step, preset, mode, config and metrics_summary; extra keys (architecture, ...)
    are kept. format_version is set here.
    """
    from safetensors.torch import save as safetensors_save

    missing = [key for key in SIDECAR_REQUIRED_KEYS if key != "format_version" and key not in metadata]
    if missing:
        raise ValueError(f"snapshot metadata lacks required keys: {', '.join(missing)}")
    tensors, aliases = _dedupe_shared_tensors(model_state_dict)
    weights_path, sidecar_path = snapshot_paths(run_dir, stem)
    sidecar = {
        **metadata,
        "format_version": FORMAT_VERSION,
        "weights_file": weights_path.name,
        "tied_weights": dict(sorted(aliases.items())),
    }
    sidecar_bytes = to_json_bytes(sidecar)
    header = {
        "format": "pt",
        _ST_ALIASES_KEY: json.dumps(aliases, sort_keys=True),
        _ST_METADATA_KEY: sidecar_bytes.decode("utf-8"),
    }
    atomic_write_bytes(weights_path, safetensors_save(tensors, metadata=header))
    atomic_write_bytes(sidecar_path, sidecar_bytes)
    return weights_path


def load_model_snapshot(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a snapshot from its .safetensors, its .json, or its stem; tied names share one tensor again."""
    from safetensors import safe_open

    given = Path(path)
    step = re.fullmatch(r"ckpt-step-(\d+)\.pt", given.name)
    if step:
        # A resume checkpoint (optimizer and all); its weights are also in the model-only snapshot of that step.
        raise UserError(f"{given} is a resume checkpoint; pass the model snapshot of that step, "
                        f"{given.parent / f'model-step-{step.group(1)}.safetensors'}, or the run directory")
    stem = given.name[: -len(given.suffix)] if given.suffix in (".safetensors", ".json") else given.name
    weights_path, sidecar_path = snapshot_paths(given.parent, stem)
    if not weights_path.is_file():
        raise UserError(f"model snapshot {weights_path} does not exist; pass a <stem>.safetensors written by "
                        "this trainer (model-step-<n>, best-model or final-model)")
    try:
        tensors: dict[str, torch.Tensor] = OrderedDict()
        with safe_open(str(weights_path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    except Exception as err:
        raise UserError(f"{weights_path} is not a readable safetensors file ({_one_line(err)}); "
                        "pass a snapshot written by this trainer") from err

    for alias, target in json.loads(header.get(_ST_ALIASES_KEY, "{}")).items():
        tensors[alias] = tensors[target]

    if _ST_METADATA_KEY in header:
        metadata = json.loads(header[_ST_METADATA_KEY])
        if sidecar_path.is_file():
            try:
                on_disk = json.loads(sidecar_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                on_disk = None
            if on_disk is None or on_disk.get("step") != metadata.get("step"):
                log.warning("%s disagrees with the metadata inside %s (interrupted save?); "
                            "using the metadata stored with the weights", sidecar_path.name, weights_path.name)
    elif sidecar_path.is_file():
        metadata = json.loads(sidecar_path.read_text(encoding="utf-8"))
    else:
        raise UserError(f"{weights_path} carries no trainer metadata and {sidecar_path.name} is missing; "
                        "pass a snapshot written by this trainer")
    return dict(tensors), metadata


# --------------------------------------------------------------------------- optimizer state by name


def _names_by_identity(named_params: dict[str, torch.nn.Parameter]) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, param in named_params.items():
        names.setdefault(id(param), name)  # tied parameters: the first name is the canonical one
    return names


def _optimizer_param_names(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[list[str]]:
    grouped = []
    for group in optimizer.param_groups:
        members = []
        for param in group["params"]:
            if id(param) not in names:
                raise ValueError(f"optimizer holds a parameter of shape {tuple(param.shape)} that is not in "
                                 "named_params; pass model.named_parameters() of the optimised model")
            members.append(names[id(param)])
        grouped.append(members)
    return grouped


def optimizer_state_to_named(
    optimizer: torch.optim.Optimizer, named_params: dict[str, torch.nn.Parameter]
) -> dict[str, Any]:
    """Optimizer state keyed by parameter name instead of position, with each group's hyperparameters."""
    positional = optimizer.state_dict()
    grouped_names = _optimizer_param_names(optimizer, _names_by_identity(named_params))
    state: dict[str, Any] = {}
    groups = []
    for saved_group, names in zip(positional["param_groups"], grouped_names, strict=False):
        for index, name in zip(saved_group["params"], names, strict=False):
            if index in positional["state"]:
                state[name] = positional["state"][index]
        hyper = {key: value for key, value in saved_group.items() if key not in ("params", "param_names")}
        groups.append({**hyper, "params": list(names)})
    return {"state": state, "param_groups": groups}


def _same_value(first: Any, second: Any) -> bool:
    if isinstance(first, torch.Tensor) or isinstance(second, torch.Tensor):
        return torch.equal(torch.as_tensor(first), torch.as_tensor(second))
    return _normalise(first) == _normalise(second)


# Group entries that are not settings: the lr (and its base) belong to the scheduler, the rest is bookkeeping.
_NOT_SETTINGS = ("params", "param_names", "names", "role", "lr", "initial_lr")
_OPTIM_KEYS = {"weight_decay": "optim.weight_decay", "betas": "optim.beta1/beta2", "eps": "optim.eps"}


def optimizer_state_from_named(
    optimizer: torch.optim.Optimizer, named_state: dict[str, Any], named_params: dict[str, torch.nn.Parameter]
) -> None:
    """Load state saved by optimizer_state_to_named into `optimizer`, however its groups are ordered.

    Each parameter takes the state and hyperparameters of the group it belonged to when saved; a group
    of this optimizer whose members were saved with different hyperparameters cannot be represented and
    is refused. Names must match both ways, so a renamed or added parameter never resumes silently
    with fresh moments.
    """
    grouped_names = _optimizer_param_names(optimizer, _names_by_identity(named_params))
    current_names = {name for names in grouped_names for name in names}

    saved_group_of: dict[str, int] = {}
    for group_index, group in enumerate(named_state["param_groups"]):
        for name in group["params"]:
            saved_group_of[name] = group_index
    for name in list(saved_group_of) + list(named_state["state"]):
        if name not in named_params:
            raise UserError(f"the checkpoint's optimizer state names parameter '{name}', which this model does "
                            "not have; resume with the architecture the checkpoint was trained with "
                            "or start a fresh run")
        if name not in current_names:
            raise UserError(f"the checkpoint's optimizer state names parameter '{name}', which this run's "
                            "optimizer does not train; resume with the same trainable parameters or start "
                            "a fresh run")
    for name in sorted(current_names - set(saved_group_of)):
        raise UserError(f"parameter '{name}' has no optimizer state in the checkpoint (new or renamed?); "
                        "resume with the architecture the checkpoint was trained with or start a fresh run")

    positional_state: dict[int, Any] = {}
    positional_groups = []
    index = 0
    for group, names in zip(optimizer.param_groups, grouped_names, strict=False):
        hyper: dict[str, Any] | None = None
        hyper_source = ""
        for name in names:
            saved = {k: v for k, v in named_state["param_groups"][saved_group_of[name]].items() if k != "params"}
            if hyper is None:
                hyper, hyper_source = saved, name
            else:
                for key in sorted(set(hyper) | set(saved)):
                    if not _same_value(hyper.get(key), saved.get(key)):
                        raise UserError(f"parameters '{hyper_source}' and '{name}' share an optimizer group here "
                                        f"but were saved with {key}={hyper.get(key)!r} and {saved.get(key)!r}; "
                                        "group parameters as the checkpoint did or start a fresh run")
            if name in named_state["state"]:
                positional_state[index] = named_state["state"][name]
            index += 1
        if hyper is None:  # an empty group keeps its own settings
            hyper = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        positional_groups.append({**hyper, "params": list(range(index - len(names), index))})
    # Settings travel with each parameter's state (above), so an optim.* edited for the resumed run does not
    # apply; say so rather than ignore it silently. (The lr is the scheduler's and does follow the config.)
    configured = [{k: v for k, v in group.items() if k not in _NOT_SETTINGS} for group in optimizer.param_groups]
    optimizer.load_state_dict({"state": positional_state, "param_groups": positional_groups})
    kept = sorted({f"{_OPTIM_KEYS.get(key, key)}={group[key]!r} (this run's config: {value!r})"
                   for group, settings in zip(optimizer.param_groups, configured, strict=True)
                   for key, value in settings.items() if key in group and not _same_value(group[key], value)})
    if kept:
        log.warning("resuming keeps the checkpoint's optimizer settings: %s; start a fresh run to change them",
                    "; ".join(kept))
