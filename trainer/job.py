"""One Hydra job: validate the composed config, save it resolved next to the run, then train (or tokenize)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from trainer.schema import validate


def run_job(cfg: DictConfig) -> dict:
    config = validate(cfg)  # before any torch import: user mistakes cost nothing
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    is_main = int(os.environ.get("RANK", 0)) == 0  # under torchrun, one process writes and reports
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))

    if config.run.task == "tokenize":
        from data.tokenize_shards import tokenize_data

        return {"task": "tokenize", "domains": tokenize_data(config.data)}

    from trainer.fit import describe_outputs, train

    summary = train(config, run_dir)
    # The run's objects are garbage now, some of it cyclic (ZeRO hangs its process group on every parameter).
    # Collect it here, while the interpreter is whole: left to shutdown, a process group's gloo threads are
    # torn down during interpreter finalization, a known source of aborts at exit after a finished run.
    gc.collect()
    if is_main:
        print(describe_outputs(summary), flush=True)
    if "exit_code" in summary:
        # Stopped by SIGTERM/Ctrl-C with a checkpoint: exit as a shell reports that signal (143, 130), so a
        # job script or a --multirun sweep sees the run is unfinished and does not go on as if it were.
        raise SystemExit(summary["exit_code"])
    return summary
