"""Model families by name (`model.family`), the one place the trainer finds them.

A family is a package `models/<family>/` (or any importable package) with
- `config.py`: `SCHEMA`, its config dataclass (a models.family.ModelConfig: keys, defaults, rules), torch-free;
- `model.py`: `build(model_cfg, vocab_size, eos_id) -> nn.Module` whose forward(input_ids, document_ids=None,
  labels=None) returns models.output.ModelOutput (the batch contract: trainer/base/batch.py; lm_loss is the mean
  over scored targets, 0 when there are none), and which offers `architecture()` (what a checkpoint must match),
  `no_weight_decay()` and `callbacks(cfg)` (schedules, monitors and statistics, trainer.base.callbacks.Callback);
- `analysis.py` (routed families only): its routing figures, the contract in models/analysis.py;
- `report.py` (routed families only): its columns and curves in a sweep report, the contract in models/report.py.
Adding a family: its folder, one line in FAMILIES, and conf/model/<family>.yaml (`defaults: [/schema/model/
<family>@_here_, _self_]`). The loop reaches families only through here.
"""

from __future__ import annotations

import importlib
import importlib.util

from trainer.base.errors import UserError

FAMILIES: dict[str, str] = {
    "dense": "models.gpt2",
    "moe": "models.moe",
    "polyglu": "models.polyglu",
}


def register_family(family: str, package: str) -> None:
    """Add a family from outside this repository's models/ (a plugin, or a test's toy family)."""
    FAMILIES[family] = package


def _package(family: str) -> str:
    if family not in FAMILIES:
        raise UserError(f"model.family='{family}' is unknown; known families: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[family]


def config_schema(family: str) -> type:
    """The family's config dataclass; imports no torch."""
    return importlib.import_module(f"{_package(family)}.config").SCHEMA


def config_schemas() -> dict[str, type]:
    return {family: config_schema(family) for family in FAMILIES}


def build_model(model_cfg, vocab_size: int, eos_id: int):
    module = importlib.import_module(f"{_package(model_cfg.family)}.model")
    return module.build(model_cfg, vocab_size=vocab_size, eos_id=eos_id)


def _optional_module(family: str, name: str):
    package = _package(family)
    if importlib.util.find_spec(f"{package}.{name}") is None:
        return None
    return importlib.import_module(f"{package}.{name}")


def routing_analysis(family: str):
    """The family's `analysis` module (models/analysis.py), or None for a family without routing (dense)."""
    return _optional_module(family, "analysis")


def family_report(family: str):
    """The family's `report` module (models/report.py): its sweep report columns and curves; None without one."""
    return _optional_module(family, "report")
