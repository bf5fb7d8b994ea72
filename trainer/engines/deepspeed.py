"""DeepSpeed ZeRO (stage 2 by default) with the trainer's own AdamW and warmup-cosine schedule.

DeepSpeed owns gradient accumulation, reduction, clipping and (in bf16) the master weights, so its config
gets our micro-batch, accumulation and clip values and *no* optimizer or scheduler section: ours are
handed to deepspeed.initialize and stay the single source of training behaviour. Optimizer state lives in
DeepSpeed's own sharded format, saved and loaded here as a whole directory; where that directory goes and
which checkpoints it can resume from are trainer.checkpoint's to decide.
"""

from __future__ import annotations

import os
import socket

import torch

from trainer.engines.base import model_inputs
from trainer.engines.distributed import DistributedEngine, backend_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DeepSpeedEngine(DistributedEngine):
    name = "deepspeed"

    def __init__(self, hw):
        # A plain `python trainer/run.py hardware=...` is a world of one; DeepSpeed still wants the env.
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                           ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        super().__init__(hw)
        import deepspeed

        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        deepspeed.init_distributed(dist_backend=backend_for(hw, self.device), verbose=False)

    def ds_config(self, train_cfg) -> dict:
        ds = self.hw.deepspeed
        return {
            "train_micro_batch_size_per_gpu": train_cfg.batch_size,
            "gradient_accumulation_steps": train_cfg.grad_accum_steps,
            "gradient_clipping": train_cfg.max_grad_norm,
            "bf16": {"enabled": self.hw.precision == "bf16"},
            "zero_optimization": {
                "stage": ds.zero_stage, "overlap_comm": ds.overlap_comm,
                "contiguous_gradients": ds.contiguous_gradients,
                "reduce_bucket_size": ds.reduce_bucket_size, "allgather_bucket_size": ds.allgather_bucket_size,
            },
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def setup(self, model, optimizer, scheduler, train_cfg) -> None:
        import deepspeed

        super().setup(model, optimizer, scheduler, train_cfg)
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                config=self.ds_config(train_cfg))
        self.forward_module = torch.compile(self.ds) if self.hw.compile else self.ds

    def forward(self, batch):
        # DeepSpeed casts the module to bf16 itself when enabled, so no autocast on top.
        return self.forward_module(**model_inputs(batch))

    def eval_forward(self, batch):
        return self.model(**model_inputs(batch))

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already divided by grad_accum_steps; DeepSpeed must not divide again. step() after every
        # micro-batch is DeepSpeed's protocol: it reduces, clips and updates only on the boundary.
        self.ds.backward(loss, scale_wrt_gas=False)
        self.ds.step()

    def optimizer_step(self) -> float:
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def model_state_dict(self) -> dict:
        # In bf16 DeepSpeed casts the module itself; a full checkpoint keeps fp32 weights all the same.
        return {k: v.detach().float() if v.is_floating_point() else v for k, v in self.model.state_dict().items()}

    def save_native(self, directory, tag: str) -> None:
        self.ds.save_checkpoint(str(directory), tag=tag)

    def load_native(self, directory, tag: str) -> None:
        self.ds.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        self.scheduler.sync_optimizer_lr()  # the ZeRO optimizer state may load after the scheduler's

    def close(self) -> None:
        # DeepSpeed's own teardown, not just torch's: deepspeed.comm also drops the process groups that
        # deepspeed.utils.groups keeps in module globals, and the engine lets go of its ZeRO buffers.
        # torch's destroy_process_group alone leaves those groups (and their gloo threads) alive until
        # interpreter shutdown, where destroying them is a known source of aborts at exit.
        import deepspeed.comm

        if getattr(self, "ds", None) is not None:
            self.ds.destroy()
            self.ds = self.forward_module = None
        if deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()
