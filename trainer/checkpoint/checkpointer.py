"""The Checkpointer: one object, built once per run by fit.py, that owns what checkpoints mean to the run.

It chooses what to resume from, tells whether the run is already complete, assembles and writes full
checkpoints and model snapshots (and prunes old ones), restores everything on resume, and keeps DeepSpeed's
own state beside the portable .pt. Engines hand over their model, optimizer and scheduler and, for DeepSpeed,
a collective save and load of a directory; names, layout, payload and refusals are decided here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from trainer.base.errors import UserError
from trainer.checkpoint import files
from trainer.checkpoint.full import (
    FORMAT_VERSION,
    find_latest_checkpoint,
    load_full_checkpoint,
    opens,
    rng_states_by_rank,
    save_full_checkpoint,
)
from trainer.checkpoint.optimizer_state import optimizer_state_from_named, optimizer_state_to_named
from trainer.checkpoint.snapshots import save_model_snapshot
from trainer.config.schema import Config
from trainer.config.validate import RECORDED_CONFIG, resolved_yaml
from trainer.rng import capture_rng_state, restore_rng_state
from trainer.tracking import SUMMARY_FILE

if TYPE_CHECKING:
    from trainer.callbacks import CallbackList
    from trainer.engines.base import Engine
    from trainer.run_state import LoopState

log = logging.getLogger(__name__)

# The engine whose optimizer state lives in its own sharded format, in files.deepspeed_dir beside the .pt,
# under this tag (DeepSpeed's sub-directory name); the .pt's optimizer_state_dict names the tag.
DEEPSPEED = "deepspeed"
DEEPSPEED_TAG = "state"


def rng_state_for(checkpoint: dict, engine) -> dict | None:
    """This process's RNG state from a checkpoint; None for a process the checkpoint has none for (the world
    grew), which keeps its own stream seeded with run.seed + rank: rank 0's state would make it draw the same
    dropout masks and router noise as rank 0 for the rest of the run."""
    by_rank = rng_states_by_rank(checkpoint)
    if len(by_rank) != engine.world_size and engine.is_main:
        log.warning("checkpoint was written by %d processes, this run has %d: processes beyond the checkpoint's "
                    "draw from fresh random streams, so dropout draws differ from the original run", len(by_rank),
                    engine.world_size)
    return by_rank[engine.rank] if engine.rank < len(by_rank) else None


def _recorded_as(text: str) -> dict:
    """A resolved config as data, without run.resume: re-launching with run.resume=auto is the same run."""
    data = OmegaConf.to_container(OmegaConf.create(text))
    data.get("run", {}).pop("resume", None)
    return data


class Checkpointer:
    """Checkpoints of one run directory, for one run's config and engine.

    fit.py asks, in this order: resume_source(), remove_stale_temporaries(), completed_run() (before building
    anything), restore() and completed_run(step) (once the model, optimizer and stream exist). The loop calls
    save_if_due() after every update, save() on a stop signal, save_best_model() when the eval loss improves
    and save_final_model() at the end. Saves are collective: every process calls them; rank 0 writes.
    """

    def __init__(self, cfg: Config, run_dir: Path, engine: Engine):
        self.cfg, self.run_dir, self.engine = cfg, Path(run_dir), engine
        # What run.init_from loaded (path, step, sha256), recorded with every artifact; restored on resume.
        self.init_from: dict | None = None
        self.deepspeed = engine.name == DEEPSPEED
        self.last_saved_step = 0  # the step restored from, once resumed: it is on disk already

    @property
    def config_dict(self) -> dict:
        # Read at each save: fit.py settles what only the data tells (train.epochs' max_steps) after building this.
        return asdict(self.cfg)

    # ------------------------------------------------------------------ what to resume from

    def resume_source(self) -> Path | None:
        """Which checkpoint to continue from (run.resume: null, auto or a path); refuses to silently start over
        on top of an existing run."""
        wanted, run_dir = self.cfg.run.resume, self.run_dir
        if wanted is None:
            existing = files.list_full_checkpoints(run_dir)
            if existing:
                raise UserError(f"{run_dir} already holds checkpoints (newest: step {existing[-1][0]}); "
                                "continue it with run.resume=auto, or start a new run with run.name=<other name>")
            return None
        if wanted == "auto":
            found = find_latest_checkpoint(run_dir)
            if found is None and (existing := files.list_full_checkpoints(run_dir)):
                # Starting fresh here would train over the run's record and overwrite its checkpoints one by one.
                raise UserError(f"run.resume=auto: none of the checkpoints in {run_dir} loads (newest: "
                                f"{existing[-1][1].name}; see the warnings above); move them out of that directory "
                                "to start the run over, or start a new run with run.name=<other name>")
            if found is None:
                log.info("run.resume=auto: no checkpoint in %s, starting fresh", run_dir)
            return found
        path = Path(wanted)
        if not path.is_file():
            raise UserError(f"run.resume={wanted!r} is not a file; give a ckpt-step-<n>.pt path or run.resume=auto")
        return path

    def remove_stale_temporaries(self) -> list[Path]:
        """On the main process, delete what saves killed mid-write left (before anything saves)."""
        return files.remove_stale_temporaries(self.run_dir) if self.engine.is_main else []

    # ------------------------------------------------------------------ a completed run

    def completed_run(self, step: int | None = None) -> dict | None:
        """summary.json of a run that already completed what this config asks for, so there is nothing to
        train; None otherwise. The one test of "completed", asked at two points:

        - before anything is built (step None), for a run re-launched with run.resume=auto and the config it
          recorded (a sweep re-run), so finished jobs cost seconds. Such a run continues from its newest
          checkpoint; without a final checkpoint (checkpoint.save_final=false) the newest is older than the end
          and summary.json, written last, is the whole record, so the end is train.max_steps. Anything else, a
          changed config included, goes the long way: the checkpoint is loaded, and a changed architecture is
          refused.
        - once a checkpoint is loaded (step: its step): the same run under another, compatible config (another
          hardware.device, say).

        Completed means summary.json says so at that step, at or past train.max_steps, with the final model
        written where checkpoint.save_final asks for one: a run killed between its last checkpoint and its final
        snapshot is not complete, nor one whose final checkpoint a user deleted to redo the tail from an earlier.
        """
        save_final, max_steps = self.cfg.checkpoint.save_final, self.cfg.train.max_steps
        if step is None:
            if not self._relaunched_unchanged():
                return None
            if save_final:
                checkpoints = files.list_full_checkpoints(self.run_dir)
                if not checkpoints:
                    return None
                step = checkpoints[-1][0]
            else:
                step = max_steps
        summary_path = self.run_dir / SUMMARY_FILE
        if step < max_steps or not summary_path.is_file():
            return None
        if save_final and not files.snapshot_paths(self.run_dir, files.FINAL_MODEL)[0].is_file():
            return None
        summary = json.loads(summary_path.read_text())
        return summary if summary.get("status") == "completed" and summary.get("final_step") == step else None

    def _relaunched_unchanged(self) -> bool:
        """run.resume=auto into a run that finished writing (summary.json) with the config it recorded."""
        recorded = self.run_dir / RECORDED_CONFIG
        if self.cfg.run.resume != "auto" or not recorded.is_file() or not (self.run_dir / SUMMARY_FILE).is_file():
            return False
        return _recorded_as(recorded.read_text()) == _recorded_as(resolved_yaml(self.cfg))

    # ------------------------------------------------------------------ resume

    def restore(self, path: Path, stream, callbacks: CallbackList, state: LoopState) -> None:
        """Bring back everything the run had at the checkpoint `path`: weights, optimizer and scheduler (or
        DeepSpeed's own state), data position, callbacks, loop state and every process's RNG. Refuses (UserError,
        one line) a checkpoint of another architecture, format or engine, and later checkpoints that
        run.resume=auto would pick over this run's own. Every process calls it, after engine.setup."""
        architecture = self.engine.model.architecture()
        checkpoint = load_full_checkpoint(path, expected={"mode": architecture["family"],
                                                          "architecture": architecture})
        saved_by = checkpoint.get("engine", "single")
        if (saved_by == DEEPSPEED) != self.deepspeed:
            raise UserError(f"{path} was written by the {saved_by} engine, whose optimizer state this "
                            f"{self.engine.name} run cannot read; resume with the hardware it was trained on")
        step = int(checkpoint["step"])
        self._settle_later_checkpoints(step)
        self._restore_training_state(checkpoint, Path(path))
        stream.load_state_dict(checkpoint["data_state"])
        callbacks.load_state_dict(checkpoint["callback_state"])
        state.load(step, checkpoint["loop_state"])
        rng_state = rng_state_for(checkpoint, self.engine)
        if rng_state is not None:
            restore_rng_state(rng_state)  # last: building consumed random numbers
        self.init_from = checkpoint.get("init_from")
        self.last_saved_step = step
        log.info("resumed from %s at step %d", path, state.step)

    def _settle_later_checkpoints(self, step: int) -> None:
        """Deal with checkpoints of run_dir beyond the resumed step. keep_last_k keeps the highest steps and
        run.resume=auto takes the highest that loads, so left in place they would crowd out the resumed run's own
        checkpoints and be resumed from after its next stop, as if they were its own."""
        run_dir = self.run_dir
        later = [path for saved, path in files.list_full_checkpoints(run_dir) if saved > step]
        if not later:
            return
        names = ", ".join(path.name for path in later)
        # Under auto these are the newer files find_latest_checkpoint skipped. One that does not even open is a
        # save cut short and can go; anything else (a rollback to an earlier path, a foreign file) is the user's.
        if self.cfg.run.resume != "auto" or any(opens(path) for path in later):
            raise UserError(f"{run_dir} holds checkpoints after step {step} ({names}), which run.resume=auto would "
                            "later pick over this run's own; move them out of that directory first, or resume into "
                            "another run.name")
        if self.engine.is_main:
            log.warning("removing %s: newer than step %d but unreadable (a save cut short)", names, step)
            files.remove_full_checkpoints(later)

    def _restore_training_state(self, checkpoint: dict, path: Path) -> None:
        engine = self.engine
        if self.deepspeed:
            engine.load_native(self._deepspeed_state_of(checkpoint, path), DEEPSPEED_TAG)
            return
        engine.model.load_state_dict(checkpoint["model_state_dict"])
        optimizer_state_from_named(engine.optimizer, checkpoint["optimizer_state_dict"],
                                   dict(engine.model.named_parameters()))
        engine.scheduler.load_state_dict(checkpoint["scheduler_state_dict"])

    def _deepspeed_state_of(self, checkpoint: dict, path: Path) -> Path:
        """The DeepSpeed directory beside the checkpoint `path`, once this run is known to be able to read it."""
        directory = files.deepspeed_dir(path.parent, int(checkpoint["step"]))
        if not directory.is_dir():
            raise UserError(f"{path} was saved by DeepSpeed but {directory.name} is missing next to it; "
                            "resume from another checkpoint or with the engine that wrote it")
        # ZeRO (stage >= 1) saves each process's partition of the optimizer state and cannot re-partition it
        # for another world size; DeepSpeed would only say so in a traceback, after loading the weights.
        saved_world, world = len(rng_states_by_rank(checkpoint)), self.engine.world_size
        saved_stage = checkpoint["config"]["hardware"]["deepspeed"]["zero_stage"]
        stage = self.cfg.hardware.deepspeed.zero_stage
        if (saved_stage > 0) != (stage > 0):  # stages 1 and 2 share one optimizer state format; 0 has its own
            raise UserError(f"{path} holds the optimizer state of hardware.deepspeed.zero_stage="
                            f"{saved_stage}, which zero_stage={stage} cannot read; resume with "
                            f"hardware.deepspeed.zero_stage={saved_stage}")
        if saved_stage > 0 and saved_world != world:
            raise UserError(f"{path} holds ZeRO-{saved_stage} optimizer state partitioned over "
                            f"{saved_world} process(es), which DeepSpeed cannot re-partition for this run's "
                            f"{world}; resume with {saved_world} process(es) in all (one machine: "
                            f"torchrun --nproc_per_node={saved_world})")
        return directory

    # ------------------------------------------------------------------ saving

    def save_if_due(self, state: LoopState, stream, callbacks: CallbackList, final: bool) -> None:
        """After an update: a full checkpoint every checkpoint.save_every steps, and after the run's last update
        (`final`: max_steps or a callback's stop) when checkpoint.save_final asks for one."""
        if state.step % self.cfg.checkpoint.save_every == 0 or (final and self.cfg.checkpoint.save_final):
            self.save(state, stream, callbacks)

    def save(self, state: LoopState, stream, callbacks: CallbackList) -> None:
        """A full checkpoint of this step (and DeepSpeed's state beside it), its model snapshot, then pruning to
        checkpoint.keep_last_k checkpoints and checkpoint.keep_last_snapshots snapshots. A step already saved is
        not saved again."""
        step, engine = state.step, self.engine
        if step == self.last_saved_step and files.checkpoint_path(self.run_dir, step).exists():
            return
        if self.deepspeed:
            self._save_deepspeed_state(step)
        # Every process draws its own dropout masks, so every process's RNG goes into the checkpoint.
        rng_by_rank = engine.gather_object(capture_rng_state())
        if engine.is_main:
            payload = {
                **self._identity(step), **self._training_state(), **rng_by_rank[0],
                "rng_states_by_rank": rng_by_rank,
                "data_state": stream.state_dict(), "callback_state": callbacks.state_dict(),
                "loop_state": state.to_checkpoint(), "engine": engine.name,
            }
            save_full_checkpoint(self.run_dir, step, payload)
            self._write_snapshot(files.model_step_stem(step), state)
            files.prune_full_checkpoints(self.run_dir, self.cfg.checkpoint.keep_last_k)
            if self.cfg.checkpoint.keep_last_snapshots is not None:
                files.prune_model_snapshots(self.run_dir, self.cfg.checkpoint.keep_last_snapshots)
        engine.barrier()
        self.last_saved_step = step

    def save_best_model(self, state: LoopState) -> None:
        """The best-model snapshot: the eval loss just improved."""
        self._write_snapshot(files.BEST_MODEL, state)

    def save_final_model(self, state: LoopState) -> None:
        """The final-model snapshot at the end of a finished run, when checkpoint.save_final asks for one."""
        if self.cfg.checkpoint.save_final:
            self._write_snapshot(files.FINAL_MODEL, state)

    def _identity(self, step: int) -> dict:
        """What both artifact kinds record about the run: the seed's identity keys plus the architecture."""
        architecture = self.engine.model.architecture()
        return {"format_version": FORMAT_VERSION, "step": step, "preset": self.cfg.run.preset,
                "mode": architecture["family"], "config": self.config_dict, "architecture": architecture,
                "init_from": self.init_from}

    def _write_snapshot(self, stem: str, state: LoopState) -> None:
        if not self.engine.is_main:
            return
        sidecar = {**self._identity(state.step),
                   "metrics_summary": {**state.last_eval, "best_eval_loss": state.best_eval_loss,
                                       "tokens_seen": state.tokens_seen}}
        save_model_snapshot(self.run_dir, stem, self.engine.model.state_dict(), sidecar)

    def _training_state(self) -> dict:
        """Model, optimizer (by parameter name) and scheduler state for the .pt. Under DeepSpeed the sharded
        optimizer state stays in its own directory and the .pt names its tag."""
        engine = self.engine
        if self.deepspeed:
            optimizer_state = {"deepspeed_checkpoint_tag": DEEPSPEED_TAG}
        else:
            optimizer_state = optimizer_state_to_named(engine.optimizer, dict(engine.model.named_parameters()))
        return {"model_state_dict": engine.model_state_dict(), "optimizer_state_dict": optimizer_state,
                "scheduler_state_dict": engine.scheduler.state_dict()}

    def _save_deepspeed_state(self, step: int) -> None:
        """Every process writes its part into the staging directory; one rename then puts it in place, so the
        directory appears complete or not at all."""
        engine = self.engine
        final, staging = files.deepspeed_dir(self.run_dir, step), files.deepspeed_staging_dir(self.run_dir, step)
        if engine.is_main and staging.exists():
            shutil.rmtree(staging)
        engine.barrier()
        engine.save_native(staging, DEEPSPEED_TAG)
        engine.barrier()
        if engine.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        engine.barrier()
