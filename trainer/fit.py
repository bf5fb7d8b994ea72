"""build(cfg) -> components -> loop: the one place that wires hardware, data, model, optimizer and artifacts."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

from data.build import build_data
from models.registry import build_model, routing_analysis
from trainer.base.errors import UserError, one_line
from trainer.base.metrics import EVAL_LOSS
from trainer.callbacks import CallbackList, NonFiniteLossGuard
from trainer.checkpoint import FINAL_MODEL, Checkpointer, snapshot_paths
from trainer.checkpoint.init_from import InitSource, find_init_source, load_initial_weights
from trainer.config.schema import Config, check_warmup
from trainer.config.validate import record_config
from trainer.engines import build_engine
from trainer.loop import TrainingLoop
from trainer.optim import build_optimizer, build_scheduler
from trainer.rng import seed_everything, use_deterministic_kernels
from trainer.routing_analysis import RoutingAnalysis
from trainer.run_state import LoopState
from trainer.stop_signals import StopSignals
from trainer.tracking import METRICS_FILE, SUMMARY_FILE, Tracker

log = logging.getLogger(__name__)


def _say_already_completed(step: int, max_steps: int) -> None:
    # A sweep re-launched with run.resume=auto: a finished run's snapshots, figures, summary and wall time
    # stay as they are instead of being re-written for a run of zero steps.
    log.info("run already completed at step %d (train.max_steps=%d): nothing to train; raise train.max_steps "
             "to train it longer", step, max_steps)


def use_source_tokenizer(cfg: Config, source: InitSource) -> None:
    """run.init_from's weights index the source run's vocabulary: the data is tokenized with its tokenizer."""
    wanted = str(source.tokenizer_dir)
    if cfg.data.tokenizer.name not in ("bpe", wanted):
        log.warning("data.tokenizer.name=%s is replaced by %s: run.init_from's weights were trained with that "
                    "tokenizer", cfg.data.tokenizer.name, wanted)
    cfg.data.tokenizer.name = wanted


def steps_from_epochs(cfg: Config, train_blocks: int, world_size: int) -> None:
    """train.epochs -> train.max_steps: whole updates covering that many passes over the training blocks (the
    last update tops up from the next shuffled pass)."""
    per_update = cfg.train.batch_size * cfg.train.grad_accum_steps * world_size
    cfg.train.max_steps = max(1, math.ceil(cfg.train.epochs * train_blocks / per_update))
    log.info("train.epochs=%g over %d training blocks at %d blocks per update: train.max_steps=%d", cfg.train.epochs,
             train_blocks, per_update, cfg.train.max_steps)
    check_warmup(cfg)


def run_status(state: LoopState, max_steps: int, error: str | None) -> str:
    """summary.json's status: failed (an exception ended it), interrupted (a stop signal, or a second Ctrl-C,
    before max_steps), stopped_early (a callback's reason: collapse, a non-finite loss) or completed."""
    if error is not None:
        return "failed"
    if state.stopped_by_signal:
        return "interrupted"
    if state.stop_reason:
        return "stopped_early"
    return "completed" if state.step >= max_steps else "interrupted"


def train(cfg: Config, run_dir: Path, sweep: str | None = None) -> dict:
    """Train one run in run_dir. `sweep` names the --multirun sweep it is a job of: its W&B group, the
    runs then named by their directories (0_moe-main, 1_moe-main, ...) rather than all by run.name."""
    started = time.time()
    engine = build_engine(cfg.hardware)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(cfg, run_dir, engine)
    start_from = checkpointer.resume_source()
    checkpointer.remove_stale_temporaries()
    finished = checkpointer.completed_run()  # a finished sweep job, before data and model are built
    if finished is not None:
        _say_already_completed(finished["final_step"], cfg.train.max_steps)
        engine.close()
        return finished
    init_source = find_init_source(cfg.run.init_from) if cfg.run.init_from else None
    if init_source is not None:
        use_source_tokenizer(cfg, init_source)
    cfg.model.check_sources()  # offline, a hub model fails before the data is prepared, not after
    if cfg.hardware.deterministic:
        use_deterministic_kernels()
    seed_everything(cfg.run.seed)
    # Rank 0 tokenizes and fills the cache first; the others then read it instead of racing to write it.
    if not engine.is_main:
        engine.barrier()
    data = build_data(cfg.data, seed=cfg.data.split_seed)
    if engine.is_main:
        engine.barrier()
    if cfg.train.epochs is not None:
        steps_from_epochs(cfg, data.train_blocks(), engine.world_size)
    if engine.is_main and start_from is None:
        record_config(cfg, run_dir)
    config_dict = asdict(cfg)

    model = build_model(cfg.model, vocab_size=data.tokenizer.vocab_size, eos_id=data.tokenizer.eos_id)
    if init_source is not None and start_from is None:
        checkpointer.init_from = load_initial_weights(model, init_source)
    elif init_source is not None:
        log.info("run.init_from=%s is not loaded: the run continues from its own checkpoint %s", cfg.run.init_from,
                 start_from)
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
    analysis = routing_analysis(cfg.model.family)
    callbacks = CallbackList([NonFiniteLossGuard(), *model.callbacks(cfg),
                              *([RoutingAnalysis(analysis, model, data.eval)] if analysis else [])])

    state = LoopState(launched_at=started)
    if start_from is not None:
        checkpointer.restore(start_from, stream, callbacks, state)
        finished = checkpointer.completed_run(state.step)  # the same run under another, compatible config
        if finished is not None:
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
        loop = TrainingLoop(cfg, engine, stream, data.eval, tracker, callbacks, run_dir, checkpointer, state,
                            stop_signals=stop_signals)
        error = None  # an exception that ends the run: summary.json says it failed, and with what
        try:
            state = loop.run()
        except Exception as err:
            error = one_line(err, with_type=not isinstance(err, UserError))
            raise
        finally:
            tracker_mode = tracker.wandb_mode
            summary = {
                "run_name": cfg.run.name, "preset": cfg.run.preset, "mode": model.architecture()["family"],
                "status": run_status(state, cfg.train.max_steps, error), "error": error,
                "stop_reason": state.stop_reason, "final_step": state.step, "max_steps": cfg.train.max_steps,
                "tokens_seen": state.tokens_seen, "best_eval_loss": state.best_eval_loss,
                "final_eval": state.last_eval, "resumed_from": str(start_from) if start_from else None,
                # Over every launch of the run (LoopState); a resumed run's own launch took this_launch_s.
                "wall_time_s": state.wall_time_s, "this_launch_s": time.time() - started,
                "wandb_mode": tracker_mode, "run_dir": str(run_dir),
                "world_size": engine.world_size, "engine": engine.name,
                "n_parameters": sum(p.numel() for p in model.parameters()),
                "epochs": cfg.train.epochs, "init_from": checkpointer.init_from,
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
        lines.append(f"  eval loss {_number(summary['final_eval'].get(EVAL_LOSS))}"
                     f" (best {_number(summary['best_eval_loss'])})")
    lines += [f"  run directory: {run_dir}", f"  metrics:       {run_dir / METRICS_FILE}",
              f"  summary:       {run_dir / SUMMARY_FILE}"]
    final = snapshot_paths(run_dir, FINAL_MODEL)[0]
    if final.exists():
        lines.append(f"  final model:   {final}")
    return "\n".join(lines)
