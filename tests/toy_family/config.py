"""model=toy: its keys, defaults and rules (torch-free, like every family's config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from models.family import ModelConfig
from trainer.base.checks import Rule
from trainer.base.errors import UserError


@dataclass
class ToyConfig(ModelConfig):
    family: str = "toy"
    d_model: int = 16
    max_len: int = 128

    RULES: ClassVar[list[Rule]] = [("d_model", lambda v: v >= 1, "an integer >= 1")]

    def check(self, block_size: int) -> None:
        if block_size > self.max_len:
            raise UserError(f"data.block_size={block_size} exceeds model.max_len={self.max_len}")


SCHEMA = ToyConfig
