"""Turn a user's config mistake, raised by Hydra, OmegaConf or the schema, into one actionable line.

`explain` returns None for anything that is not a user mistake, so real bugs keep their traceback;
`explain_merge` words a refusal of validate()'s typed merge. Both name the key, the value and what would work.
"""

from __future__ import annotations

import difflib
import re
import typing
from dataclasses import MISSING, fields, is_dataclass
from typing import Any

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from models.registry import config_schemas
from trainer.base.errors import UserError
from trainer.config.schema import Config

NEW_DOMAIN_HOW = ("copy conf/data/local.yaml to conf/data/<name>.yaml (or to <dir>/data/<name>.yaml with "
                  "hydra.searchpath=[file://<dir>]), list the domain there, use data=<name>")


def _group_of(err: MissingConfigException) -> str:
    match = re.search(r"Could not find '([^']+)/([^'/]+)'", str(err))
    return match.group(1) if match else "?"


def _family_of(schema: type | None) -> str | None:
    return next((family for family, known in config_schemas().items() if known is schema), None)


def _omegaconf_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "?"
    detail = str(err).splitlines()[0]
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        *parent, leaf = str(key).split(".")
        if parent == ["model"]:
            selected = _family_of(getattr(err, "object_type", None))
            schemas = config_schemas()
            owners = [f for f, schema in schemas.items() if leaf in {x.name for x in fields(schema)}]
            if selected and owners:
                # In --multirun, Hydra checks plain overrides against the default preset before applying
                # a swept one, so a key of the swept presets' family needs that family named explicitly.
                # The selected family may have its own spelling (polyglu's n_layers for GPT-2's n_layer).
                own = difflib.get_close_matches(leaf, [x.name for x in fields(schemas[selected])], n=1)
                meant = f" (did you mean model.{own[0]}?)" if own else ""
                return (f"'{key}' belongs to model family {' / '.join(owners)}, not to the selected {selected}"
                        f"{meant}; add model={owners[0]} (also in --multirun sweeps over presets of that family)")
            if selected:
                return f"unknown key '{key}': {suggest(leaf, [x.name for x in fields(config_schemas()[selected])])}"
        candidates = keys_of(getattr(err, "parent_node", None)) or allowed_keys_at(parent)
        if not candidates and getattr(err, "object_type", None) is dict:
            # An empty mapping such as a domain's filter: its entries are the user's to name, but Hydra adds a
            # key to a config node only when told to with '+'.
            return (f"unknown key '{key}': {'.'.join(parent)} has no entry '{leaf}' yet; add one with a leading "
                    f"+: +{key}=<value>")
        line = f"unknown key '{key}': {suggest(leaf, candidates)}"
        if parent == ["data", "domains"]:
            line += f"; a new domain goes in a data entry: {NEW_DOMAIN_HOW}"
        return line
    if "is not a subclass of DomainConfig" in detail:
        return (f"data.domains.{key}: a new domain cannot be added on the command line (omegaconf rejects it); "
                f"declare it in a data entry instead: {NEW_DOMAIN_HOW}")
    if isinstance(err, ValidationError):
        # A value of the wrong type: object_type is the schema dataclass that holds the key.
        hint = expected_value(getattr(err, "object_type", None), str(getattr(err, "key", "")), str(key))
        detail = detail.rstrip(".") + hint
    return f"{key}: {detail}"


def _user_error_in(err: BaseException | None) -> UserError | None:
    """A UserError itself, or one raised inside a resolver (run_dir_name) that OmegaConf and Hydra wrapped."""
    while err is not None:
        if isinstance(err, UserError):
            return err
        err = err.__cause__ or err.__context__
    return None


def explain(err: BaseException) -> str | None:
    refusal = _user_error_in(err)
    if refusal is not None:
        return str(refusal)
    if isinstance(err, MissingConfigException) and getattr(err, "options", None) is not None:
        group = _group_of(err)
        wanted = str(err).split("Could not find '", 1)[-1].split("'", 1)[0].rsplit("/", 1)[-1]
        return f"{group}={wanted} is not a config in conf/{group}/; available: {', '.join(sorted(err.options))}"
    if isinstance(err, ConfigCompositionException):
        cause = err.__cause__ or err.__context__  # Hydra chains some errors implicitly
        source = re.match(r"In '([^']+)/([^'/]+)'", str(err))
        if source and isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
            # A config file set a key the selected configs lack: typically a preset written for one model
            # family combined with another family on the command line.
            group, name = source.groups()
            return (f"conf/{group}/{name}.yaml sets '{cause.full_key}', which the selected configs do not have; "
                    f"if you chose another model= than {group}={name} selects, drop that override")
        if isinstance(cause, OmegaConfBaseException):
            return _omegaconf_line(cause)
        return str(err).splitlines()[0]
    if isinstance(err, (OverrideParseException, MissingConfigException)):
        return str(err).splitlines()[0]
    if isinstance(err, OmegaConfBaseException):
        return _omegaconf_line(err)
    return None


# Common short names that spelling similarity cannot map to this schema's keys.
ALIASES = {"lr": "learning_rate", "wd": "weight_decay", "bs": "batch_size", "steps": "max_steps",
           "layers": "n_layer", "heads": "n_head"}


def suggest(name: str, candidates: list[str]) -> str:
    alias = ALIASES.get(name)
    close = [alias] if alias in candidates else difflib.get_close_matches(name, candidates, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}allowed keys here: {', '.join(sorted(candidates))}"


def _schema_node(schema: Any, path: list[str]) -> Any:
    node: Any = schema
    for part in path:
        if not is_dataclass(node):
            return None
        spec = {f.name: f for f in fields(node)}.get(part)
        if spec is None:
            return None
        if part == "model" and node is Config:
            return _ModelKeys
        default = _default(spec)
        node = type(default) if is_dataclass(default) else None
    return node


class _ModelKeys:
    """Stand-in for "any model family" when listing the keys allowed under model."""


def allowed_keys_at(path: list[str], schema: Any = None) -> list[str]:
    """Keys the schema allows at a dotted path (as a list of parts); model lists every family's keys."""
    node = _schema_node(schema or Config, path)
    if node is _ModelKeys:
        return sorted({f.name for s in config_schemas().values() for f in fields(s)})
    return [f.name for f in fields(node)] if node is not None and is_dataclass(node) else []


def keys_of(node: object) -> list[str]:
    """The keys of the OmegaConf node that refused a key: a dataclass's fields, or a dict's entries (such as the
    composed data.domains), which the schema alone cannot list. Empty for anything else."""
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def explain_merge(err: OmegaConfBaseException, schema: type, prefix: str = "") -> str:
    """validate()'s typed merge of `schema` refused a key or a value; `prefix` is where that schema sits."""
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        *parent, leaf = str(key).split(".")
        candidates = keys_of(getattr(err, "parent_node", None))
        return f"unknown key '{prefix}{key}': {suggest(leaf, candidates or allowed_keys_at(parent, schema))}"
    detail = str(err).splitlines()[0]
    if isinstance(err, ValidationError):
        *parent, leaf = str(key).split(".")
        detail = detail.rstrip(".") + expected_value(_schema_node(schema, parent), leaf, f"{prefix}{key}")
    return f"{prefix}{key}: {detail}"


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def expected_value(node: Any, leaf: str, key: str) -> str:
    """'; expected an integer, for example model.topk=1': field `leaf` of schema dataclass `node` in words,
    with its default written as an override. OmegaConf's own message ("could not be converted to Integer",
    "str is not a ListConfig") leaves the user to work out what to type. Empty when there is nothing to say."""
    if not (isinstance(node, type) and is_dataclass(node)):
        return ""
    spec = {f.name: f for f in fields(node)}.get(leaf)
    if spec is None:
        return ""
    hint = typing.get_type_hints(node).get(leaf)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = typing.get_origin(hint) is typing.Union and len(args) == 1
    base = args[0] if optional else hint
    if typing.get_origin(base) is list:
        words = "a list"
    elif base in _TYPE_WORDS:
        words = _TYPE_WORDS[base]
    else:
        return ""
    default = _default(spec)
    example = "" if default in (None, MISSING) else f", for example {key}={as_override(default)}"
    return f"; expected {words}{' or null' if optional else ''}{example}"


def as_override(value: Any) -> str:
    """A value as written on the command line: true/false, [8,9,10,11]."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(as_override(v) for v in value) + "]"
    return str(value)


def _default(spec: Any) -> Any:
    return spec.default_factory() if spec.default_factory is not MISSING else spec.default  # type: ignore[misc]
