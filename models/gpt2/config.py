"""model=dense: GPT-2's sizes (or a pretrained checkpoint) and their rules. MoE extends it (models/moe/config.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import ClassVar, Optional

from models.family import ModelConfig
from trainer.base.checks import Rule
from trainer.base.errors import UserError
from trainer.base.hub import require_hub


@dataclass
class GPT2Config(ModelConfig):
    """GPT-2 small's 12 blocks (so the MoE seed's moe_layers 8-11 are its last four) at a width that trains on a
    CPU in minutes. GPT-2 small itself: n_embd=768 n_head=12 (dropout 0.1), or pretrained=gpt2."""

    family: str = "dense"
    # "gpt2" (needs the Hugging Face Hub; pair with data.tokenizer.name=gpt2) or a local directory saved with
    # save_pretrained; null = random init from the sizes below
    pretrained: Optional[str] = None
    n_layer: int = 12
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 1024
    dropout: float = 0.0
    # No token attends across the documents of a packed block (and positions restart at 0 per document); off
    # by default because the MoE-emergence seed trained transformers' GPT-2 on packed blocks without masks, so
    # preset results stay comparable with it. SFT presets will turn it on. Backends: models/layers/attention.py.
    document_masking: bool = False

    RULES: ClassVar[list[Rule]] = [
        ("n_layer", lambda v: v >= 1, "an integer >= 1"),
        ("n_embd", lambda v: v >= 1, "an integer >= 1"),
        ("n_head", lambda v: v >= 1, "an integer >= 1"),
        ("n_positions", lambda v: v >= 8, "an integer >= 8"),
        ("dropout", lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    ]

    def check(self, block_size: int) -> None:
        if self.n_embd % self.n_head:
            raise UserError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                            "pick sizes where n_embd % n_head == 0")
        if self.pretrained is None and block_size > self.n_positions:
            raise UserError(f"data.block_size={block_size} exceeds model.n_positions={self.n_positions}; "
                            "lower data.block_size or raise model.n_positions")

    def rebuilt(self, architecture: dict) -> GPT2Config:
        return replace(super().rebuilt(architecture), pretrained=None)

    def check_sources(self) -> None:
        if self.pretrained and not os.path.isdir(self.pretrained):
            require_hub("model.pretrained", self.pretrained,
                        "use a local directory saved with save_pretrained, or model.pretrained=null for random init")


SCHEMA = GPT2Config
