"""DistributedDataParallel under torchrun: gloo on CPU (loopback), nccl on CUDA."""

from __future__ import annotations

import contextlib
import datetime

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainer.engines.distributed import DistributedEngine, backend_for


class DDPEngine(DistributedEngine):
    name = "ddp"

    def __init__(self, hw):
        super().__init__(hw)
        # Up front, so data building can be ordered across ranks before the model exists.
        if not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend=backend_for(hw, self.device), timeout=datetime.timedelta(minutes=10))

    def setup(self, model, optimizer, scheduler, train_cfg) -> None:
        super().setup(model, optimizer, scheduler, train_cfg)
        ddp = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.ddp = ddp
        self.forward_module = torch.compile(ddp) if self.hw.compile else ddp

    def micro_step(self, is_last: bool):
        # Gradients are all-reduced once per optimizer step, on the last micro-batch, not on every one.
        return contextlib.nullcontext() if is_last else self.ddp.no_sync()
