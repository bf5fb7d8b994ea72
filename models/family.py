"""What every model family's config shares: the `family` key and the hooks config validation calls.

Standard library only (config validation and `--cfg job` must not import torch). A family's config
dataclass extends ModelConfig in `models/<family>/config.py`, keeps its range rules in RULES beside its
fields, and overrides `check` for rules that relate several keys.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import ClassVar

from trainer.base.checks import Rule


@dataclass
class ModelConfig:
    family: str = "dense"

    # (key, test, what would work), checked by config validation as model.<key>; ClassVar: not a config key.
    RULES: ClassVar[list[Rule]] = []

    def check(self, block_size: int) -> None:
        """Rules across keys, after RULES; `block_size` is data.block_size, the context the model must take.
        Raises trainer.base.errors.UserError (one line)."""

    def check_sources(self) -> None:
        """What the model loads from outside the run (a hub checkpoint), checked before data is prepared, so an
        offline run fails at once rather than after minutes of tokenizing."""

    def rebuilt(self, architecture: dict) -> ModelConfig:
        """This config with the sizes a snapshot's architecture recorded, so its weights load into what it builds;
        a family that loads weights from elsewhere (GPT-2's `pretrained`) drops that: the snapshot has them all."""
        known = {f.name for f in fields(self)} - {"family"}
        return replace(self, **{key: value for key, value in architecture.items() if key in known})
