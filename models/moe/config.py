"""model=moe: GPT-2 (models/gpt2/config.py) whose blocks in `moe_layers` get a routed Mixture-of-Experts FFN."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from models.gpt2.config import GPT2Config
from trainer.base.checks import Rule
from trainer.base.errors import UserError


@dataclass
class MoEGPT2Config(GPT2Config):
    """Experts start as copies of their block's MLP (+ a small perturbation), a noisy top-k router picks them, and
    Switch load-balancing + z-loss keep the router honest. Defaults: the MoE-emergence seed's."""

    family: str = "moe"
    moe_layers: list[int] = field(default_factory=lambda: [8, 9, 10, 11])
    num_experts: int = 8
    topk: int = 1
    noise_std: float = 0.1  # router logit noise at step 0 (training only)
    noise_anneal_fraction: float = 0.25  # noise falls linearly to 0 over this fraction of max_steps; 0 = constant
    expert_perturbation: float = 0.01  # expert copies get N(0, (this * weight std)^2) so they can diverge
    lb_coef: float = 0.01  # Switch load-balancing loss weight
    z_coef: float = 0.001  # router z-loss weight
    collapse_stop: bool = False  # stop the run when routing collapses (see collapse_*)
    collapse_check_every: int = 100
    collapse_threshold: float = 0.6  # an expert's share of tokens above this in any MoE layer counts as collapsed
    collapse_patience: int = 3  # consecutive collapsed checks before stopping

    RULES: ClassVar[list[Rule]] = [
        *GPT2Config.RULES,
        ("num_experts", lambda v: v >= 2, "an integer >= 2"),
        ("noise_std", lambda v: v >= 0, "a number >= 0 (0 disables router noise)"),
        ("noise_anneal_fraction", lambda v: 0 <= v <= 1, "a fraction in [0, 1] (0 = no annealing)"),
        ("expert_perturbation", lambda v: v >= 0, "a number >= 0"),
        ("lb_coef", lambda v: v >= 0, "a number >= 0 (0 disables load balancing)"),
        ("z_coef", lambda v: v >= 0, "a number >= 0"),
        ("collapse_check_every", lambda v: v >= 1, "an integer >= 1"),
        ("collapse_threshold", lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
        ("collapse_patience", lambda v: v >= 1, "an integer >= 1"),
    ]

    def check(self, block_size: int) -> None:
        super().check(block_size)
        self.check_layout(self.n_layer if self.pretrained is None else None)

    def check_layout(self, n_layer: Optional[int]) -> None:
        """top-k, the collapse threshold and the MoE blocks against the depth. At validation the depth of a
        pretrained model is not known yet (None); the model checks again once it has loaded it."""
        if not 1 <= self.topk <= self.num_experts:
            raise UserError(f"model.topk={self.topk} must be between 1 and model.num_experts={self.num_experts}")
        even = self.topk / self.num_experts  # each expert's share of tokens when routing is perfectly even
        if self.collapse_stop and self.topk == self.num_experts:
            # Every expert takes every token, so no threshold can tell collapse apart (suggesting one would loop).
            raise UserError(f"model.collapse_stop=true cannot detect collapse with model.topk={self.topk} of "
                            f"model.num_experts={self.num_experts}: every expert takes every token; set "
                            "model.collapse_stop=false, or lower model.topk")
        if self.collapse_stop and not even < self.collapse_threshold < 1:
            raise UserError(f"model.collapse_threshold={self.collapse_threshold} can never tell collapse apart: an "
                            f"expert's share of tokens is {even:g} at even routing (topk {self.topk} of "
                            f"{self.num_experts} experts) and at most 1; pick a value between them, such as "
                            f"{round((1 + even) / 2, 2):g}")
        if not self.moe_layers:
            raise UserError("model.moe_layers is empty; name the blocks that get experts (for example [8, 9, 10, 11])")
        if len(set(self.moe_layers)) != len(self.moe_layers):
            raise UserError(f"model.moe_layers={list(self.moe_layers)} repeats a block; list each block once")
        if n_layer is not None:
            bad = [i for i in self.moe_layers if not 0 <= i < n_layer]
            if bad:
                raise UserError(f"model.moe_layers={list(self.moe_layers)} names block {bad[0]}, but the model has "
                                f"n_layer={n_layer} blocks (0..{n_layer - 1}); pick blocks in that range "
                                "or raise model.n_layer")


SCHEMA = MoEGPT2Config
