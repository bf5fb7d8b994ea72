"""What every multi-process engine shares: the process-group backend, reductions, barriers, teardown."""

from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.base.errors import UserError
from trainer.engines.base import Engine


def backend_for(hw, device: torch.device) -> str:
    if hw.dist_backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if hw.dist_backend == "nccl" and (device.type != "cuda" or not dist.is_nccl_available()):
        # Refused here, in one line, rather than as init_process_group's "NCCL not built in" traceback.
        raise UserError(f"hardware.dist_backend=nccl (hardware={hw.name}) needs CUDA devices and a torch built with "
                        f"NCCL; this run is on {device.type}: use hardware.dist_backend=gloo or auto")
    return hw.dist_backend


class DistributedEngine(Engine):
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        dist.barrier()

    def gather_object(self, obj) -> list:
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
