"""Pick the execution engine named by hardware.engine ("auto": DDP when launched by torchrun with >1 process)."""

from __future__ import annotations

import os

from trainer.base.errors import UserError
from trainer.config.schema import HardwareConfig
from trainer.engines.base import Engine


def build_engine(hw: HardwareConfig) -> Engine:
    engine = hw.engine
    world = int(os.environ.get("WORLD_SIZE", 1))
    if engine == "auto":
        engine = "ddp" if world > 1 else "single"
    if engine == "single" and world > 1:
        raise UserError(f"hardware.engine=single but WORLD_SIZE={world} (launched by torchrun); "
                        "use hardware.engine=ddp or auto")
    if engine == "ddp":
        if "RANK" not in os.environ:
            raise UserError("hardware.engine=ddp needs torchrun: torchrun --nproc_per_node=N trainer/run.py ...")
        from trainer.engines.ddp import DDPEngine

        return DDPEngine(hw)
    if engine == "deepspeed":
        from trainer.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(hw)
    return Engine(hw)
