"""DistributedDataParallel under torchrun: gloo on CPU (loopback), nccl on CUDA."""

from __future__ import annotations

import contextlib
import datetime

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainer.engines.base import Engine


def init_process_group(hw, device: torch.device) -> None:
    if dist.is_initialized():
        return
    backend = hw.dist_backend if hw.dist_backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=10))


class DDPEngine(Engine):
    name = "ddp"

    def __init__(self, hw):
        super().__init__(hw)
        # Up front, so data building can be ordered across ranks before the model exists.
        init_process_group(hw, self.device)

    def setup(self, model, optimizer, scheduler, train_cfg) -> None:
        super().setup(model, optimizer, scheduler, train_cfg)
        ddp = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.ddp = ddp
        self.forward_module = torch.compile(ddp) if self.hw.compile else ddp

    def micro_step(self, is_last: bool):
        # Gradients are all-reduced once per optimizer step, on the last micro-batch, not on every one.
        return contextlib.nullcontext() if is_last else self.ddp.no_sync()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
