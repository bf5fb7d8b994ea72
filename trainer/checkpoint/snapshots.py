"""Model-only snapshots: `<stem>.safetensors` (weights) and `<stem>.json` (metadata), for evaluation and sharing.

Both files are written atomically, and the metadata travels inside the safetensors header too, so weights and
metadata cannot drift apart even if a crash lands between writing the two. Tied weights are stored once.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from trainer.base.atomic_files import atomic_write_bytes
from trainer.base.errors import UserError, one_line
from trainer.base.json_files import to_json_bytes
from trainer.checkpoint.files import SIDECAR_SUFFIX, WEIGHTS_SUFFIX, checkpoint_step, model_step_stem, snapshot_paths
from trainer.checkpoint.full import FORMAT_VERSION

log = logging.getLogger(__name__)

SIDECAR_REQUIRED_KEYS = ("format_version", "step", "preset", "mode", "config", "metrics_summary")

# Header keys of the safetensors file: the sidecar's content, and the tied-weight aliases.
_ST_METADATA_KEY = "trainer_metadata"
_ST_ALIASES_KEY = "trainer_aliases"


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
    step = checkpoint_step(given)
    if step is not None:
        # A resume checkpoint (optimizer and all); its weights are also in the model-only snapshot of that step.
        raise UserError(f"{given} is a resume checkpoint; pass the model snapshot of that step, "
                        f"{snapshot_paths(given.parent, model_step_stem(step))[0]}, or the run directory")
    stem = given.name[: -len(given.suffix)] if given.suffix in (WEIGHTS_SUFFIX, SIDECAR_SUFFIX) else given.name
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
        raise UserError(f"{weights_path} is not a readable safetensors file ({one_line(err)}); "
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
