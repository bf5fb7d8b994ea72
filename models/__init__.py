"""Model families behind one interface.

A family is a module with `build(model_cfg, vocab_size, eos_id) -> nn.Module` whose forward takes
`input_ids` (and optionally `document_ids`) and returns `models.output.ModelOutput`. The module also
offers `architecture() -> dict` (what must match for a checkpoint to load into it), `no_weight_decay()`
(names beyond the 1-D parameters that must not decay) and `callbacks(cfg) -> list` (schedules and
monitors the family needs). The training loop reaches families only through FAMILIES.
"""

from __future__ import annotations

import importlib

from models.output import ModelOutput, lm_output

FAMILIES = {"dense": "models.gpt2", "moe": "models.gpt2_moe", "polyglu": "models.polyglu_lm"}


def build_model(model_cfg, vocab_size: int, eos_id: int):
    family = model_cfg.family
    module = importlib.import_module(FAMILIES[family])
    return module.build(model_cfg, vocab_size=vocab_size, eos_id=eos_id)


__all__ = ["FAMILIES", "ModelOutput", "build_model", "lm_output"]
