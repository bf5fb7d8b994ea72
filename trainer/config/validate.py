"""Validate a composed config against the schema, and the record of it a run directory keeps.

Hydra composes conf/; `validate()` merges the result onto the typed schema (the trainer's sections, data.*, and
the chosen model family's), then runs every section's rules, so a misspelt key, a wrong type or an impossible
value stops the run with one line naming the key, the value and what would work.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.config import check_data, own_domains
from models.registry import config_schema, config_schemas
from trainer.base.atomic_files import atomic_write_bytes
from trainer.base.checks import check_rules
from trainer.base.errors import UserError
from trainer.config.explain import explain_merge
from trainer.config.schema import Config, check_run_name, check_trainer

RECORDED_CONFIG = "resolved_config.yaml"  # a run's record of the config it was trained with
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # trainer/run.py's config tree


def register_schemas() -> None:
    """Put the schema in Hydra's ConfigStore so keys and types are checked while composing, and let Hydra's run
    directory refuse a run.name that is a path before it creates anything.

    conf/config.yaml extends `base_config`; each conf/model/*.yaml extends `/schema/model/<family>`.
    """
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    for family, schema in config_schemas().items():
        store.store(group="schema/model", name=family, node=schema)
    if not OmegaConf.has_resolver("run_dir_name"):
        OmegaConf.register_new_resolver("run_dir_name", check_run_name)


def compose_config(overrides: list[str]) -> Config:
    """The validated Config trainer/run.py would train with, given these command-line overrides, composed in-process
    from conf/: for tools, benchmarks and tests that need a run's config without launching one."""
    from hydra import compose, initialize_config_dir

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return validate(compose("config", overrides=overrides))


def validate(cfg: DictConfig) -> Config:
    """Check a composed config against the schema; return it typed. Raises UserError (one line)."""
    raw = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(raw, dict):
        raise UserError("the composed config is not a mapping")
    if "data" in raw:
        raw["data"] = own_domains(raw["data"])  # a data entry's domains are its own, not local.yaml's placeholder
    model_raw = raw.get("model") or {}
    model_schema = config_schema(model_raw.get("family", "dense"))
    try:
        model = OmegaConf.merge(OmegaConf.structured(model_schema), model_raw)
    except OmegaConfBaseException as err:
        raise UserError(explain_merge(err, model_schema, prefix="model.")) from None
    rest = {k: v for k, v in raw.items() if k != "model"}
    try:
        typed = OmegaConf.merge(OmegaConf.structured(Config), rest)
    except OmegaConfBaseException as err:
        raise UserError(explain_merge(err, Config)) from None
    result: Config = OmegaConf.to_object(typed)  # type: ignore[assignment]
    result.model = OmegaConf.to_object(model)

    check_trainer(result)
    check_data(result.data, tokenizing=result.run.task == "tokenize")
    check_rules(result.model, type(result.model).RULES, prefix="model.")
    result.model.check(result.data.block_size)
    return result


def resolved_yaml(config: Config) -> str:
    """The validated config, every default filled in, as written to a run's resolved_config.yaml."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def record_config(config: Config, run_dir: Path) -> None:
    """resolved_config.yaml: the validated config a run directory's checkpoints (or shards) were made with.
    Training writes it once the run is accepted, so a refused launch cannot overwrite it."""
    atomic_write_bytes(Path(run_dir) / RECORDED_CONFIG, resolved_yaml(config).encode())
