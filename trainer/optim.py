"""AdamW with parameter groups by role, and the warmup + cosine schedule over max_steps."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

log = logging.getLogger(__name__)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only matrices; biases, norm scales (all 1-D) and whatever the model names in
    `no_weight_decay()` (e.g. 2-D routing logits) are excluded, whatever their shape."""
    extra = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name in extra else decay).append(name)
    params = dict(model.named_parameters())
    return [
        {"params": [params[n] for n in decay], "weight_decay": weight_decay, "role": "decay", "names": decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0, "role": "no_decay", "names": no_decay},
    ]


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.AdamW:
    groups = [g for g in parameter_groups(model, optim_cfg.weight_decay) if g["params"]]
    return torch.optim.AdamW(groups, lr=optim_cfg.learning_rate, betas=(optim_cfg.beta1, optim_cfg.beta2),
                             eps=optim_cfg.eps)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine to min_ratio at total_steps (on resume the scheduler's
    state carries the position; the shape comes from the resumed run's config)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float,
                 min_ratio: float = 0.0, warmup_steps: int | None = None):
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps if warmup_steps is not None else int(warmup_fraction * total_steps)
        self.min_ratio = min_ratio
        super().__init__(optimizer, self._multiplier)

    def _multiplier(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, self.warmup_steps, self.min_ratio)

    def state_dict(self) -> dict:
        # LambdaLR would pickle the bound method; the schedule is a pure function of these fields.
        return {k: v for k, v in super().state_dict().items() if k != "lr_lambdas"}

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue at the saved step, on the schedule this run is configured with.

        The saved shape (total steps, warmup, floor, peak lr) is not restored over the configured one:
        a run resumed with a larger train.max_steps would otherwise keep the old cosine, which has already
        reached its floor, and train on at lr 0 without a word. A changed schedule is named in a warning.
        """
        configured = {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                      "min_ratio": self.min_ratio, "base_lrs": list(self.base_lrs)}
        super().load_state_dict({**state_dict, "lr_lambdas": [None] * len(self.optimizer.param_groups)})
        saved_lr = self.get_last_lr()[0]
        changed = [f"{_CONFIG_KEYS[k]} {_short(state_dict[k])} -> {_short(v)}" for k, v in configured.items()
                   if k in state_dict and state_dict[k] != v]
        self.__dict__.update(configured)
        self.sync_optimizer_lr()
        if changed:
            log.warning("resuming at step %d with another lr schedule than the checkpoint's (%s): the learning "
                        "rate follows this run's config, %.3g -> %.3g now", self.last_epoch, "; ".join(changed),
                        saved_lr, self.get_last_lr()[0])

    def sync_optimizer_lr(self) -> None:
        """Set every group's lr to the schedule's value at the current step (after an optimizer state load,
        which brings back the lr the checkpoint's schedule had)."""
        self._last_lr = [base * self._multiplier(self.last_epoch) for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr


_CONFIG_KEYS = {"total_steps": "train.max_steps", "warmup_steps": "optim.warmup_steps/warmup_fraction",
                "min_ratio": "optim.min_lr_ratio", "base_lrs": "optim.learning_rate"}


def _short(value):
    return value[0] if isinstance(value, list) and len(set(value)) == 1 else value


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, max_steps: int) -> WarmupCosine:
    return WarmupCosine(optimizer, total_steps=max_steps, warmup_fraction=optim_cfg.warmup_fraction,
                        min_ratio=optim_cfg.min_lr_ratio, warmup_steps=optim_cfg.warmup_steps)
