"""Checkpointing, all of it: full resume checkpoints, model-only snapshots, resume and completed-run policy.

    files.py            names of everything written (ckpt-step-N.pt, ckpt-step-N.deepspeed/, model-step-N,
                        best-model, final-model), listing, pruning, stale temporaries
    full.py             the .pt payload: required keys, atomic save, weights_only load, compatibility refusals
    snapshots.py        <stem>.safetensors + <stem>.json sidecar
    optimizer_state.py  optimizer state by parameter name
    checkpointer.py     Checkpointer: what to resume from, completed runs, payload assembly, save and prune,
                        restore, DeepSpeed's layout and refusals

The training loop and fit.py use the Checkpointer alone; eval reads snapshots with load_model_snapshot.
"""

from trainer.checkpoint.checkpointer import Checkpointer
from trainer.checkpoint.files import (
    BEST_MODEL,
    FINAL_MODEL,
    checkpoint_path,
    list_full_checkpoints,
    remove_stale_temporaries,
    snapshot_paths,
)
from trainer.checkpoint.full import FORMAT_VERSION, REQUIRED_KEYS, load_full_checkpoint, save_full_checkpoint
from trainer.checkpoint.snapshots import SIDECAR_REQUIRED_KEYS, load_model_snapshot, save_model_snapshot

__all__ = [
    "BEST_MODEL",
    "FINAL_MODEL",
    "FORMAT_VERSION",
    "REQUIRED_KEYS",
    "SIDECAR_REQUIRED_KEYS",
    "Checkpointer",
    "checkpoint_path",
    "list_full_checkpoints",
    "load_full_checkpoint",
    "load_model_snapshot",
    "remove_stale_temporaries",
    "save_full_checkpoint",
    "save_model_snapshot",
    "snapshot_paths",
]
