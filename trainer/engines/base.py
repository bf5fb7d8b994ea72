"""What the loop asks of an execution engine; single-device, DDP and DeepSpeed implement it."""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from trainer.base.errors import UserError
from trainer.config.schema import HardwareConfig


def resolve_device(hw: HardwareConfig, local_rank: int = 0) -> torch.device:
    wanted = hw.device
    if wanted == "auto":
        if torch.cuda.is_available():
            wanted = "cuda"
        elif torch.backends.mps.is_available():
            wanted = "mps"
        else:
            wanted = "cpu"
    if wanted == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"hardware.device=cuda (hardware={hw.name}) but no CUDA device is visible; "
                            f"use {_cpu_instead(hw)}")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if wanted == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"hardware.device=mps (hardware={hw.name}) but MPS is not available on this machine; "
                        f"use {_cpu_instead(hw)}")
    return torch.device(wanted)


def _cpu_instead(hw: HardwareConfig) -> str:
    # hardware=cpu with a device override needs the override changed, not the hardware entry.
    return "hardware.device=auto or cpu" if hw.name == "cpu" else "hardware=cpu, or hardware.device=auto"


MODEL_INPUTS = ("input_ids", "document_ids", "labels")  # a batch's keys a model's forward takes (domain_ids is not)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a model's forward takes from a batch (trainer/base/batch.py): labels only when the data has them."""
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


def autocast_context(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Engine:
    """Single process on one device. Subclasses change how gradients are reduced and where optimizer state lives."""

    name = "single"

    def __init__(self, hw: HardwareConfig):
        self.hw = hw
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = resolve_device(hw, self.local_rank)
        self.model: nn.Module | None = None  # the unwrapped model: state dicts, architecture, callbacks
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, train_cfg) -> None:
        self.model = model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.max_grad_norm = train_cfg.max_grad_norm
        self.forward_module = torch.compile(model) if self.hw.compile else model

    def forward(self, batch: dict[str, torch.Tensor]):
        with autocast_context(self.device, self.hw.precision):
            return self.forward_module(**model_inputs(batch))

    def eval_forward(self, batch: dict[str, torch.Tensor]):
        """Forward through the unwrapped model: no gradient sync, same precision as training."""
        with autocast_context(self.device, self.hw.precision):
            return self.model(**model_inputs(batch))

    def micro_step(self, is_last: bool):
        """Context for one micro-batch's forward+backward (DDP skips the all-reduce until the last)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> float:
        """Clip, step optimizer and scheduler, zero grads. Returns the pre-clip gradient norm."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass

    def gather_object(self, obj) -> list:
        """The same Python object from every process, in rank order (here: just this one)."""
        return [obj]

    def model_state_dict(self) -> dict:
        """The model's weights as a full checkpoint keeps them."""
        return self.model.state_dict()

    def save_native(self, directory, tag: str) -> None:
        """Engines with their own sharded state (DeepSpeed) write it under `directory`/`tag`, every process
        taking part; the others keep everything in the model, optimizer and scheduler."""
        raise NotImplementedError(f"the {self.name} engine has no native state; save its optimizer instead")

    def load_native(self, directory, tag: str) -> None:
        """Read back what save_native wrote (weights, optimizer and scheduler), every process taking part."""
        raise NotImplementedError(f"the {self.name} engine has no native state; load its optimizer instead")

    def close(self) -> None:
        pass
