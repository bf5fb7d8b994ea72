"""Turn a user's config mistake, raised by Hydra, OmegaConf or our schema, into one actionable line.

Returns None for anything that is not a user mistake, so real bugs keep their traceback.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import fields

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from trainer.base.errors import UserError
from trainer.schema import MODEL_SCHEMAS, allowed_keys_at, expected_value, keys_of, suggest

NEW_DOMAIN_HOW = ("copy conf/data/local.yaml to conf/data/<name>.yaml (or to <dir>/data/<name>.yaml with "
                  "hydra.searchpath=[file://<dir>]), list the domain there, use data=<name>")


def _group_of(err: MissingConfigException) -> str:
    match = re.search(r"Could not find '([^']+)/([^'/]+)'", str(err))
    return match.group(1) if match else "?"


def _family_of(schema: type | None) -> str | None:
    return next((family for family, known in MODEL_SCHEMAS.items() if known is schema), None)


def _omegaconf_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "?"
    detail = str(err).splitlines()[0]
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        *parent, leaf = str(key).split(".")
        if parent == ["model"]:
            selected = _family_of(getattr(err, "object_type", None))
            owners = [f for f, schema in MODEL_SCHEMAS.items() if leaf in {x.name for x in fields(schema)}]
            if selected and owners:
                # In --multirun, Hydra checks plain overrides against the default preset before applying
                # a swept one, so a key of the swept presets' family needs that family named explicitly.
                # The selected family may have its own spelling (polyglu's n_layers for GPT-2's n_layer).
                own = difflib.get_close_matches(leaf, [x.name for x in fields(MODEL_SCHEMAS[selected])], n=1)
                meant = f" (did you mean model.{own[0]}?)" if own else ""
                return (f"'{key}' belongs to model family {' / '.join(owners)}, not to the selected {selected}"
                        f"{meant}; add model={owners[0]} (also in --multirun sweeps over presets of that family)")
            if selected:
                return f"unknown key '{key}': {suggest(leaf, [x.name for x in fields(MODEL_SCHEMAS[selected])])}"
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


def explain(err: BaseException) -> str | None:
    if isinstance(err, UserError):
        return str(err)
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
