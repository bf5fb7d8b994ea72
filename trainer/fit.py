"""build(cfg) -> components -> loop: the one place that wires hardware, data, model, optimizer and artifacts."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from data.pipeline import build_data
from models import build_model, check_pretrained_source
from trainer.base.errors import UserError
from trainer.callbacks import CallbackList, NonFiniteLossGuard
from trainer.checkpoint import files, full
from trainer.engines import build_engine
from trainer.loop import LoopState, TrainingLoop
from trainer.optim import build_optimizer, build_scheduler
from trainer.rng import restore_rng_state, seed_everything
from trainer.schema import Config, record_config, resolved_yaml
from trainer.stop_signals import StopSignals
from trainer.tracking import Tracker

log = logging.getLogger(__name__)


def resume_path(cfg: Config, run_dir: Path) -> Path | None:
    """Which checkpoint to continue from; refuses to silently start over on top of an existing run."""
    wanted = cfg.run.resume
    if wanted is None:
        existing = files.list_full_checkpoints(run_dir)
        if existing:
            raise UserError(f"{run_dir} already holds checkpoints (newest: step {existing[-1][0]}); "
                            "continue it with run.resume=auto, or start a new run with run.name=<other name>")
        return None
    if wanted == "auto":
        found = full.find_latest_checkpoint(run_dir)
        if found is None and (existing := files.list_full_checkpoints(run_dir)):
            # Starting fresh here would train over the run's record and overwrite its checkpoints one by one.
            raise UserError(f"run.resume=auto: none of the checkpoints in {run_dir} loads (newest: "
                            f"{existing[-1][1].name}; see the warnings above); move them out of that directory to "
                            "start the run over, or start a new run with run.name=<other name>")
        if found is None:
            log.info("run.resume=auto: no checkpoint in %s, starting fresh", run_dir)
        return found
    path = Path(wanted)
    if not path.is_file():
        raise UserError(f"run.resume={wanted!r} is not a file; give a ckpt-step-<n>.pt path or run.resume=auto")
    return path


def settle_later_checkpoints(cfg: Config, run_dir: Path, step: int, is_main: bool) -> None:
    """Deal with checkpoints of run_dir beyond the resumed step. keep_last_k keeps the highest steps and
    run.resume=auto takes the highest that loads, so left in place they would crowd out the resumed run's own
    checkpoints and be resumed from after its next stop, as if they were its own."""
    later = [path for saved, path in files.list_full_checkpoints(run_dir) if saved > step]
    if not later:
        return
    names = ", ".join(path.name for path in later)
    # Under auto these are the newer files find_latest_checkpoint skipped. One that does not even open is a save
    # cut short and can go; anything else (a rollback to an earlier path, a foreign file) is the user's to move.
    if cfg.run.resume != "auto" or any(full.opens(path) for path in later):
        raise UserError(f"{run_dir} holds checkpoints after step {step} ({names}), which run.resume=auto would "
                        "later pick over this run's own; move them out of that directory first, or resume into "
                        "another run.name")
    if is_main:
        log.warning("removing %s: newer than step %d but unreadable (a save cut short)", names, step)
        files.remove_full_checkpoints(later)


def finished_summary(run_dir: Path, step: int, max_steps: int) -> dict | None:
    """summary.json of a run that completed at this step with its final model written; None otherwise
    (not yet at max_steps, or killed between its last checkpoint and its final snapshot)."""
    path = run_dir / "summary.json"
    if step < max_steps or not path.is_file() or not files.snapshot_paths(run_dir, "final-model")[0].is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("status") == "completed" and summary.get("final_step") == step else None


def _recorded_as(text: str) -> dict:
    """A resolved config as data, without run.resume: re-launching with run.resume=auto is the same run."""
    data = OmegaConf.to_container(OmegaConf.create(text))
    data.get("run", {}).pop("resume", None)
    return data


def unchanged_finished_run(cfg: Config, run_dir: Path) -> dict | None:
    """The summary of a completed run re-launched with run.resume=auto and the config it recorded (a sweep
    re-run), found before data, model and optimizer are built. Anything else, a changed config included,
    goes the long way: the checkpoint is loaded, and a changed architecture is refused."""
    recorded, summary_path = run_dir / "resolved_config.yaml", run_dir / "summary.json"
    if cfg.run.resume != "auto" or not recorded.is_file() or not summary_path.is_file():
        return None
    if _recorded_as(recorded.read_text()) != _recorded_as(resolved_yaml(cfg)):
        return None
    if cfg.checkpoint.save_final:
        # The final checkpoint and model must be there too: a user who deleted either to redo the tail from an
        # earlier checkpoint gets that.
        checkpoints = files.list_full_checkpoints(run_dir)
        return finished_summary(run_dir, checkpoints[-1][0], cfg.train.max_steps) if checkpoints else None
    # No final checkpoint or model was written. summary.json is written last, so "completed at this config's
    # max_steps" is the whole record of a finished run.
    summary = json.loads(summary_path.read_text())
    done = summary.get("status") == "completed" and summary.get("final_step") == cfg.train.max_steps
    return summary if done else None


def _say_already_completed(step: int, max_steps: int) -> None:
    # A sweep re-launched with run.resume=auto: a finished run's snapshots, figures, summary and wall time
    # stay as they are instead of being re-written for a run of zero steps.
    log.info("run already completed at step %d (train.max_steps=%d): nothing to train; raise train.max_steps "
             "to train it longer", step, max_steps)


def rng_state_for(checkpoint: dict, engine) -> dict | None:
    """This process's RNG state from a checkpoint; None for a process the checkpoint has none for (the world
    grew), which keeps its own stream seeded with run.seed + rank: rank 0's state would make it draw the same
    dropout masks and router noise as rank 0 for the rest of the run."""
    by_rank = full.rng_states_by_rank(checkpoint)
    if len(by_rank) != engine.world_size and engine.is_main:
        log.warning("checkpoint was written by %d processes, this run has %d: processes beyond the checkpoint's "
                    "draw from fresh random streams, so dropout draws differ from the original run", len(by_rank),
                    engine.world_size)
    return by_rank[engine.rank] if engine.rank < len(by_rank) else None


def train(cfg: Config, run_dir: Path, sweep: str | None = None) -> dict:
    """Train one run in run_dir. `sweep` names the --multirun sweep it is a job of: its W&B group, the
    runs then named by their directories (0_moe-main, 1_moe-main, ...) rather than all by run.name."""
    started = time.time()
    engine = build_engine(cfg.hardware)
    run_dir.mkdir(parents=True, exist_ok=True)
    start_from = resume_path(cfg, run_dir)
    if engine.is_main:
        files.remove_stale_temporaries(run_dir)
    finished = unchanged_finished_run(cfg, run_dir)
    if finished is not None:
        _say_already_completed(finished["final_step"], cfg.train.max_steps)
        engine.close()
        return finished
    if engine.is_main and start_from is None:
        record_config(cfg, run_dir)
    config_dict = asdict(cfg)

    check_pretrained_source(cfg.model)  # offline, a hub model fails before the data is prepared, not after
    seed_everything(cfg.run.seed)
    # Rank 0 tokenizes and fills the cache first; the others then read it instead of racing to write it.
    if not engine.is_main:
        engine.barrier()
    data = build_data(cfg.data, seed=cfg.data.split_seed)
    if engine.is_main:
        engine.barrier()

    model = build_model(cfg.model, vocab_size=data.tokenizer.vocab_size, eos_id=data.tokenizer.eos_id)
    model.to(engine.device)
    if engine.rank > 0:
        # Same initial weights on every process (above), but from here on each draws its own dropout
        # masks: identical masks on every rank would make the ranks' noise one noise.
        seed_everything(cfg.run.seed + engine.rank)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    engine.setup(model, optimizer, scheduler, cfg.train)
    stream = data.train_stream(cfg.train.batch_size, seed=cfg.run.seed, rank=engine.rank,
                               world_size=engine.world_size, micro_steps_per_update=cfg.train.grad_accum_steps,
                               max_steps=cfg.train.max_steps)
    callbacks = CallbackList([NonFiniteLossGuard(), *model.callbacks(cfg)])

    state = LoopState()
    if start_from is not None:
        checkpoint = full.load_full_checkpoint(
            start_from, expected={"mode": model.architecture()["family"], "architecture": model.architecture()})
        saved_by = checkpoint.get("engine", "single")
        if (saved_by == "deepspeed") != (engine.name == "deepspeed"):
            raise UserError(f"{start_from} was written by the {saved_by} engine, whose optimizer state this "
                            f"{engine.name} run cannot read; resume with the hardware it was trained on")
        settle_later_checkpoints(cfg, run_dir, int(checkpoint["step"]), engine.is_main)
        engine.load_training_state(checkpoint, start_from)
        stream.load_state_dict(checkpoint["data_state"])
        callbacks.load_state_dict(checkpoint["callback_state"])
        state.load(int(checkpoint["step"]), checkpoint["loop_state"])
        rng_state = rng_state_for(checkpoint, engine)
        if rng_state is not None:
            restore_rng_state(rng_state)  # last: building consumed random numbers
        log.info("resumed from %s at step %d", start_from, state.step)
        finished = finished_summary(run_dir, state.step, cfg.train.max_steps)
        if finished is not None:  # the same run under another, compatible config (another hardware.device)
            _say_already_completed(state.step, cfg.train.max_steps)
            engine.close()
            return finished
        if engine.is_main:
            record_config(cfg, run_dir)  # only now: a refused resume leaves the original run's record alone

    tracker = Tracker(run_dir, cfg.tracking, run_name=cfg.run.name if sweep is None else run_dir.name,
                      config=config_dict, enabled=engine.is_main, group=sweep,
                      resume_step=state.step if start_from is not None else None)
    if engine.is_main:
        (run_dir / "data_summary.json").write_text(json.dumps(data.summary, indent=2, default=str))
        data.tokenizer.save(run_dir / "tokenizer")
        n_params = sum(p.numel() for p in model.parameters())
        log.info("model %s: %.2fM parameters; engine %s on %s (%s), world size %d", model.architecture()["family"],
                 n_params / 1e6, engine.name, engine.device, cfg.hardware.precision, engine.world_size)

    # From here on SIGTERM or Ctrl-C stops the run at the next update, with a checkpoint (trainer/stop_signals.py).
    with StopSignals() as stop_signals:
        loop = TrainingLoop(cfg, engine, stream, data.eval, tracker, callbacks, run_dir, config_dict, state,
                            stop_signals=stop_signals)
        try:
            state = loop.run()
        finally:
            tracker_mode = tracker.wandb_mode
            summary = {
                "run_name": cfg.run.name, "preset": cfg.run.preset, "mode": model.architecture()["family"],
                "status": "interrupted" if state.stopped_by_signal else "stopped_early" if state.stop_reason else
                          ("completed" if state.step >= cfg.train.max_steps else "interrupted"),
                "stop_reason": state.stop_reason, "final_step": state.step, "max_steps": cfg.train.max_steps,
                "tokens_seen": state.tokens_seen, "best_eval_loss": state.best_eval_loss,
                "final_eval": state.last_eval, "resumed_from": str(start_from) if start_from else None,
                "wall_time_s": time.time() - started, "wandb_mode": tracker_mode, "run_dir": str(run_dir),
                "world_size": engine.world_size, "engine": engine.name,
                "n_parameters": sum(p.numel() for p in model.parameters()),
            }
            if engine.is_main:
                tracker.write_summary(summary)
            tracker.close()
            engine.close()
    if state.stopped_by_signal:
        summary["exit_code"] = stop_signals.exit_code  # for run.py, after summary.json is written
    return summary


def _number(value: float | None) -> str:
    return "nan" if value is None else f"{value:.4f}"  # None: a non-finite value, as summary.json stores it


def describe_outputs(summary: dict) -> str:
    run_dir = Path(summary["run_dir"])
    lines = [f"run {summary['run_name']}: {summary['status']} at step {summary['final_step']}"
             + (f" ({summary['stop_reason']})" if summary["stop_reason"] else "")]
    if summary["final_eval"]:
        lines.append(f"  eval loss {_number(summary['final_eval'].get('eval/loss'))}"
                     f" (best {_number(summary['best_eval_loss'])})")
    lines += [f"  run directory: {run_dir}", f"  metrics:       {run_dir / 'metrics.jsonl'}",
              f"  summary:       {run_dir / 'summary.json'}"]
    final = run_dir / "final-model.safetensors"
    if final.exists():
        lines.append(f"  final model:   {final}")
    return "\n".join(lines)
