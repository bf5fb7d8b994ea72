"""One Hydra job: validate the composed config, save it resolved next to the run, train, report."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from trainer.schema import validate

log = logging.getLogger(__name__)


def run_job(cfg: DictConfig) -> dict:
    config = validate(cfg)  # before any torch import: user mistakes cost nothing
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    resolved = OmegaConf.to_yaml(OmegaConf.structured(config))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "resolved_config.yaml").write_text(resolved)

    from trainer.fit import describe_outputs, train

    summary = train(config, run_dir)
    if summary["world_size"] == 1 or summary.get("rank", 0) == 0:
        print(describe_outputs(summary), flush=True)
    return summary
