"""Model families behind one interface.

A family is a module with `build(model_cfg, vocab_size, eos_id) -> nn.Module` whose forward takes
`input_ids` (and optionally `document_ids`) and returns `models.output.ModelOutput`. The module also
offers `architecture() -> dict` (what must match for a checkpoint to load into it), `no_weight_decay()`
(names beyond the 1-D parameters that must not decay) and `callbacks(cfg) -> list` (schedules and
monitors the family needs). The training loop reaches families only through FAMILIES.
"""

from __future__ import annotations

import importlib
import os

from models.output import ModelOutput, lm_output
from trainer.base.hub import require_hub

FAMILIES = {"dense": "models.gpt2", "moe": "models.gpt2_moe", "polyglu": "models.polyglu_lm"}


def build_model(model_cfg, vocab_size: int, eos_id: int):
    family = model_cfg.family
    module = importlib.import_module(FAMILIES[family])
    return module.build(model_cfg, vocab_size=vocab_size, eos_id=eos_id)


def check_pretrained_source(model_cfg) -> None:
    """Refuse a hub `model.pretrained` while the hub is unreachable. train() calls it before preparing the data,
    which can take minutes, so an offline run fails at once (families without `pretrained` pass)."""
    source = getattr(model_cfg, "pretrained", None)
    if source and not os.path.isdir(source):
        require_hub("model.pretrained", source,
                    "use a local directory saved with save_pretrained, or model.pretrained=null for random init")


__all__ = ["FAMILIES", "ModelOutput", "build_model", "check_pretrained_source", "lm_output"]
