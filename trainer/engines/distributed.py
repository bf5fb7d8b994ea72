"""What every multi-process engine shares: the process-group backend, reductions, barriers, teardown."""

from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.engines.base import Engine


def backend_for(hw, device: torch.device) -> str:
    return hw.dist_backend if hw.dist_backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")


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
