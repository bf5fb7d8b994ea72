"""The trainer's typed schema: the root Config and the sections the trainer itself owns (run, train, optim,
checkpoint, tracking, hardware), with their range rules and cross-checks.

data.* is data/config.py's and model.* the family's own (models/<family>/config.py); Config embeds both.
Standard library only: `trainer/run.py --cfg job` and config checks must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from data.config import DataConfig
from trainer.base.checks import Rule, check_choices, check_rules
from trainer.base.errors import UserError


@dataclass
class RunConfig:
    task: str = "train"  # train | tokenize (chosen with task=<name>, conf/task/)
    # The run directory, <output_dir>/<name>: a plain directory name. Defaults to the preset's name.
    name: str = "${run.preset}"
    output_dir: str = "outputs"
    seed: int = 42
    resume: Optional[str] = None  # null (fresh), "auto" (newest valid checkpoint of this run) or a path
    # Start from another run's weights (fine-tuning; a dense run into MoE: sparse upcycling): its directory (the
    # final model) or a .safetensors snapshot. Only the weights and the tokenizer come over; the optimizer,
    # schedule and step start fresh. A resumed run continues from its own checkpoint instead.
    init_from: Optional[str] = None
    preset: str = "none"  # recorded in checkpoints and sidecars; set by conf/preset/*


@dataclass
class TrainConfig:
    batch_size: int = 2  # micro-batch per process
    grad_accum_steps: int = 4
    max_steps: int = 5000  # optimizer updates
    # Passes over the training blocks; when set, it decides max_steps (rounded up to whole updates, logged and
    # recorded) once the data is built. null: max_steps decides.
    epochs: Optional[float] = None
    eval_every: int = 200
    log_every: int = 1
    log_router_every: int = 100
    max_grad_norm: float = 1.0
    eval_at_start: bool = False


@dataclass
class OptimConfig:
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    warmup_steps: Optional[int] = None  # when set, overrides warmup_fraction (the PolyGLU paper: 2000)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass
class CheckpointConfig:
    save_every: int = 500
    keep_last_k: int = 3
    # model-step-N snapshots to keep (newest); null keeps them all: the run's history, e.g. to watch experts
    # specialise over training. best-model and final-model are always kept.
    keep_last_snapshots: Optional[int] = None
    save_final: bool = True


@dataclass
class TrackingConfig:
    # auto: online (falling back to offline) when W&B credentials are configured, else offline
    wandb_mode: str = "auto"  # auto | online | offline | disabled
    wandb_project: str = "moe-emergence"
    wandb_entity: Optional[str] = None
    online_timeout_s: float = 15.0  # online init past this falls back to offline


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000


@dataclass
class HardwareConfig:
    name: str = "cpu"
    device: str = "auto"  # auto | cpu | cuda | mps
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    engine: str = "auto"  # auto (ddp under torchrun with >1 process, else single) | single | ddp | deepspeed
    compile: bool = False
    # Deterministic kernels where PyTorch has them (trainer/rng.py: use_deterministic_algorithms warn-only, a fixed
    # cuBLAS workspace, SDPA held to its math and flash kernels): on CUDA an fp32 rerun or exact resume then gives
    # the same bits, where atomics in some backward kernels would otherwise differ in the last place. Costs speed
    # and attention memory on GPU; CPU runs are deterministic already.
    deterministic: bool = False
    dist_backend: str = "auto"  # auto (nccl on cuda, gloo otherwise) | nccl | gloo
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = None  # the family's config dataclass (models/registry.py), chosen by model.family
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)


CHOICES = {
    "run.task": ("train", "tokenize"),
    "tracking.wandb_mode": ("auto", "online", "offline", "disabled"),
    "hardware.device": ("auto", "cpu", "cuda", "mps"),
    "hardware.precision": ("fp32", "bf16"),
    "hardware.engine": ("auto", "single", "ddp", "deepspeed"),
    "hardware.dist_backend": ("auto", "nccl", "gloo"),
}

# (key, test, what would work). Keys are dotted paths into the validated config.
RULES: list[Rule] = [
    ("train.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("train.grad_accum_steps", lambda v: v >= 1, "an integer >= 1"),
    ("train.max_steps", lambda v: v >= 1, "an integer >= 1"),
    ("train.epochs", lambda v: v is None or v > 0, "null (train.max_steps decides) or a positive number such as 1"),
    ("train.eval_every", lambda v: v >= 1, "an integer >= 1"),
    ("train.log_every", lambda v: v >= 1, "an integer >= 1"),
    ("train.log_router_every", lambda v: v >= 1, "an integer >= 1"),
    ("train.max_grad_norm", lambda v: v >= 0, "a number >= 0 (0 disables clipping)"),
    ("optim.learning_rate", lambda v: v > 0, "a positive number such as 5e-5"),
    ("optim.weight_decay", lambda v: v >= 0, "a number >= 0"),
    ("optim.warmup_fraction", lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    ("optim.warmup_steps", lambda v: v is None or v >= 0, "null or an integer >= 0"),
    ("optim.min_lr_ratio", lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    ("optim.beta1", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("optim.beta2", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("optim.eps", lambda v: v > 0, "a positive number"),
    ("checkpoint.save_every", lambda v: v >= 1, "an integer >= 1"),
    ("checkpoint.keep_last_k", lambda v: v >= 1, "an integer >= 1"),
    ("checkpoint.keep_last_snapshots", lambda v: v is None or v >= 1, "null (keep all) or an integer >= 1"),
    ("tracking.online_timeout_s", lambda v: v > 0, "a positive number of seconds"),
    # Stage 3 partitions the parameters themselves; snapshots and eval read full weights on rank 0 and
    # do not gather them yet, so it would write empty artifacts rather than fail.
    ("hardware.deepspeed.zero_stage", lambda v: v in (0, 1, 2), "0, 1 or 2 (stage 3 is not supported yet)"),
]


def check_trainer(cfg: Config) -> None:
    """The trainer's own sections: choices, ranges, and the rules across them."""
    check_choices(cfg, CHOICES)
    check_rules(cfg, RULES)
    check_run_name(cfg.run.name)
    if cfg.run.init_from is not None and cfg.run.resume not in (None, "auto"):
        raise UserError(f"run.init_from={cfg.run.init_from!r} starts a new run from those weights, but "
                        f"run.resume={cfg.run.resume!r} continues that checkpoint's run; drop one (run.resume=auto "
                        "continues this run, which uses run.init_from only on its first start)")
    if cfg.train.epochs is None:
        check_warmup(cfg)  # with train.epochs, once the data gives max_steps (trainer/fit.py)


def check_warmup(cfg: Config) -> None:
    warmup, steps = cfg.optim.warmup_steps, cfg.train.max_steps
    if cfg.run.task == "train" and warmup is not None and warmup >= steps:
        # A preset's warmup (polyglu-pretrain: 2000) kept in a shortened run would train it all at a sliver of the
        # learning rate, without a word.
        raise UserError(f"optim.warmup_steps={warmup} is not below train.max_steps={steps}: the run would end "
                        f"before the learning rate warms up to optim.learning_rate={cfg.optim.learning_rate:g}; "
                        f"lower optim.warmup_steps (such as {steps // 10}), or set optim.warmup_steps=null to use "
                        f"optim.warmup_fraction={cfg.optim.warmup_fraction:g}")


def check_run_name(name: str) -> str:
    """run.name is one directory inside run.output_dir: a path would write the run (and, under Hydra, its
    directory) somewhere else. Returns the name, so Hydra's run directory can be built through it."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UserError(f"run.name={name!r} is not a plain directory name; the run goes to run.output_dir/run.name, "
                        "so give a name without '/' (such as run.name=my-run), and put the directory in "
                        "run.output_dir")
    return name
