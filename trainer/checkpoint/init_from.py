"""run.init_from: a new run that starts from a finished run's weights (fine-tuning, sparse upcycling).

Not a resume: only the weights come over; the optimizer, the schedule, the data position and the step start
fresh. The source is a run directory (its final model) or one of its `.safetensors` snapshots, and the run
trains with the source run's saved tokenizer, since the weights' token ids mean nothing under another.

What may start from what: the same family with the same sizes; a family may accept others through its model's
`initial_families` and `load_initial_state(state, architecture)` (MoE GPT-2 takes a dense GPT-2: each expert
starts as a copy of its block's trained MLP). A tokenizer that gained tokens since (SFT's chat markers) grows
the vocabulary-indexed tensors, new rows at the mean of the trained ones.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from data.tokenizer import SAVED_META
from trainer.base.errors import UserError
from trainer.checkpoint.files import (
    FINAL_MODEL,
    WEIGHTS_SUFFIX,
    checkpoint_step,
    list_model_snapshots,
    model_step_stem,
    snapshot_paths,
)

log = logging.getLogger(__name__)

KEY = "run.init_from"
TOKENIZER_DIR = "tokenizer"  # where fit.py saves a run's tokenizer (TextTokenizer.save)


@dataclass(frozen=True)
class InitSource:
    given: str  # run.init_from as the user wrote it
    weights: Path  # the .safetensors snapshot
    tokenizer_dir: Path  # the source run's saved tokenizer

    @property
    def run_dir(self) -> Path:
        return self.weights.parent


def find_init_source(value: str) -> InitSource:
    """The snapshot and tokenizer run.init_from names; refuses anything else in one line. Reads no weights."""
    path = Path(value)
    if not path.exists():
        raise UserError(f"{KEY}={value!r} does not exist; pass a finished run's directory (such as "
                        f"outputs/quickstart) or one of its {WEIGHTS_SUFFIX} snapshots")
    if path.is_dir():
        weights = snapshot_paths(path, FINAL_MODEL)[0]
        if not weights.is_file():
            snapshots = list_model_snapshots(path)
            hint = (f"; pass one of its snapshots instead, such as {KEY}={snapshots[-1][1]}" if snapshots else
                    "; pass a finished run's directory or a .safetensors snapshot")
            raise UserError(f"{KEY}={value!r} holds no {weights.name}: that run has not finished{hint}")
    elif (step := checkpoint_step(path)) is not None:
        snapshot = snapshot_paths(path.parent, model_step_stem(step))[0]
        raise UserError(f"{KEY}={value!r} is a full resume checkpoint; {KEY} takes model weights: pass the snapshot "
                        f"of that step, {KEY}={snapshot}, or the run directory (its final model)")
    elif path.suffix == WEIGHTS_SUFFIX and path.is_file():
        weights = path
    else:
        raise UserError(f"{KEY}={value!r} is neither a run directory nor a {WEIGHTS_SUFFIX} snapshot; pass a finished "
                        f"run's directory (such as outputs/quickstart) or one of its {WEIGHTS_SUFFIX} files")
    tokenizer_dir = weights.parent / TOKENIZER_DIR
    if not (tokenizer_dir / SAVED_META).is_file():
        raise UserError(f"{KEY}={value!r}: {tokenizer_dir} holds no saved tokenizer, and the weights' token ids need "
                        "the tokenizer they were trained with; pass a snapshot inside a run directory this trainer "
                        "wrote")
    return InitSource(given=value, weights=weights, tokenizer_dir=tokenizer_dir)


def _as_overrides(architecture: dict, keys: list[str]) -> str:
    return " ".join(f"model.{k}={architecture[k]}" for k in keys)


def check_compatible(model, source: dict, given: str) -> None:
    """The source architecture against the model this run builds: same family (or one the model accepts) and
    the same sizes, the vocabulary aside (it may only grow)."""
    target = model.architecture()
    accepted = getattr(model, "initial_families", (target["family"],))
    if source["family"] not in accepted:
        raise UserError(f"{KEY}={given!r} holds a {source['family']} model but this run builds a {target['family']} "
                        f"model; start from a {' or '.join(accepted)} run, or choose model={source['family']}")
    differ = sorted(k for k in set(source) & set(target) if k not in ("family", "vocab_size")
                    and source[k] != target[k])
    if differ:
        raise UserError(f"{KEY}={given!r} holds a {source['family']} model with {_as_overrides(source, differ)} but "
                        f"this run builds {_as_overrides(target, differ)}; pass the source's sizes "
                        f"({_as_overrides(source, differ)})")
    if source.get("vocab_size", 0) > target["vocab_size"]:
        raise UserError(f"{KEY}={given!r} has a {source['vocab_size']}-token vocabulary but this run's tokenizer has "
                        f"{target['vocab_size']}; fine-tune with the source run's tokenizer")


def grow_vocabulary(state: dict, target_state: dict, old: int, new: int) -> tuple[dict, list[str]]:
    """Vocabulary-indexed tensors (embeddings, an untied head) from `old` to `new` rows, new rows at the mean
    of the trained ones: a new token starts as an average token rather than as noise the model never saw."""
    import torch

    grown, names = dict(state), []
    for name, tensor in state.items():
        want = target_state.get(name)
        if (want is not None and tensor.dim() >= 1 and tensor.shape[0] == old and want.shape[0] == new
                and tuple(want.shape[1:]) == tuple(tensor.shape[1:])):
            mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
            grown[name] = torch.cat([tensor, mean.expand(new - old, *tensor.shape[1:])])
            names.append(name)
    return grown, names


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_initial_weights(model, source: InitSource) -> dict:
    """Put the source's weights into `model` (built for this run); returns what the run records of it."""
    from trainer.checkpoint.snapshots import load_model_snapshot

    state, meta = load_model_snapshot(source.weights)
    architecture = meta.get("architecture")
    if not architecture:
        raise UserError(f"{KEY}={source.given!r}: {source.weights.name} records no architecture; pass a snapshot "
                        "this trainer wrote")
    check_compatible(model, architecture, source.given)
    old, new = architecture["vocab_size"], model.architecture()["vocab_size"]
    if new > old:
        state, grown = grow_vocabulary(state, model.state_dict(), old, new)
        log.info("%s: the tokenizer has %d tokens more than %s was trained with (chat markers); %s grew to %d rows, "
                 "the new rows at the mean embedding", KEY, new - old, source.weights.name, ", ".join(grown), new)
    loader = getattr(model, "load_initial_state", None)
    if loader is not None:
        loader(state, architecture)
    else:
        model.load_state_dict(state, strict=True)
    record = {"path": str(source.weights), "step": meta.get("step"), "sha256": file_sha256(source.weights),
              "family": architecture["family"], "preset": meta.get("preset")}
    log.info("%s: weights of %s (step %s, %s, sha256 %s...); optimizer, schedule and step start fresh", KEY,
             source.weights, record["step"], record["family"], record["sha256"][:12])
    return record
