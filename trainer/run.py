"""The one entrypoint: `python trainer/run.py [group=option ...] [key=value ...]`.

Hydra composes conf/ (model, data, hardware, task, preset) into one config; trainer.job validates, then
trains (task=train, the default) or writes token shards (task=tokenize).
User mistakes (unknown key, wrong type, impossible value, unknown preset) end with one line and exit
code 2; `--cfg job` prints the composed config without importing torch.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

# Runnable from a plain checkout as `python trainer/run.py` (sys.path[0] is trainer/, not the repo root).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Let exceptions reach cli() below instead of Hydra's own multi-line report; bugs still get a traceback.
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

import hydra

from trainer.config.explain import explain
from trainer.config.validate import register_schemas

register_schemas()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from trainer.base.errors import UserError, one_line
    from trainer.job import clear_failure, discard_refused_launch, holds_no_earlier_run, record_failure, run_job
    from trainer.rank_logging import quiet_replicas

    quiet_replicas(int(os.environ.get("RANK", 0)))  # under torchrun, the main process reports
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    single_process = int(os.environ.get("WORLD_SIZE", 1)) == 1  # under torchrun every rank shares run_dir
    new_run_dir = single_process and holds_no_earlier_run(run_dir)
    if (hydra_cfg.mode == RunMode.MULTIRUN and hydra_cfg.job.num == 0 and cfg.run.resume == "auto"
            and not any(o.startswith("hydra.sweep.dir=") for o in hydra_cfg.overrides.hydra)):
        # The default sweep directory is named by the launch time, so auto-resume would find no earlier sweep's
        # checkpoints and silently retrain every job from scratch.
        logging.getLogger("trainer.run").warning(
            "run.resume=auto in a new sweep directory (%s) finds no earlier sweep's runs; to finish an earlier "
            "sweep, re-launch with hydra.sweep.dir=<that sweep's directory>", hydra_cfg.sweep.dir)
    sweep_job = hydra_cfg.mode == RunMode.MULTIRUN and int(os.environ.get("RANK", 0)) == 0
    if sweep_job:
        clear_failure(run_dir)  # a job re-launched into its sweep directory starts without its last failure
    try:
        run_job(cfg)
    except Exception as err:
        # A single run says a user's mistake in one line (below) and a bug with its traceback. In a sweep the
        # error propagates, so Hydra names the failed job and runs the others (its directory stays, with the
        # job's overrides in .hydra/). Hydra reports only the sweep's first failed job at the end: each is
        # logged as it fails (console and the job's run.log), so every refused combination of the matrix is
        # visible, and recorded in the job's directory for the sweep report (eval/report).
        refused = isinstance(err, UserError)
        if sweep_job:
            overrides = " ".join(hydra_cfg.overrides.task)
            message = one_line(err, with_type=not refused)
            logging.getLogger("trainer.run").error("job #%s (%s) %s: %s", hydra_cfg.job.num, overrides,
                                                   "refused" if refused else "failed", message,
                                                   exc_info=not refused)  # a bug's traceback, in its run.log
            record_failure(run_dir, "refused" if refused else "failed", message)
        if not refused or hydra_cfg.mode == RunMode.MULTIRUN:
            raise
        if new_run_dir:
            discard_refused_launch(run_dir, Path(cfg.run.output_dir))  # no outputs/<name>/ left behind
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def cli() -> int:
    try:
        main()
    except KeyboardInterrupt:
        # Reached when nothing handled Ctrl-C itself (tokenizing, data preparation, a second Ctrl-C while
        # training): whatever was being written is atomic or resumable, so a traceback would only alarm.
        print("interrupted (Ctrl-C): task=tokenize continues where it stopped when run again; a training run "
              "continues from its last checkpoint with run.resume=auto", file=sys.stderr)
        return 130
    except Exception as err:
        message = explain(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
