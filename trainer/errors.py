"""Turn a user's config mistake, raised by Hydra, OmegaConf or our schema, into one actionable line.

Returns None for anything that is not a user mistake, so real bugs keep their traceback.
"""

from __future__ import annotations

import re

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from trainer.schema import UserError, allowed_keys_at, suggest


def _group_of(err: MissingConfigException) -> str:
    match = re.search(r"Could not find '([^']+)/([^'/]+)'", str(err))
    return match.group(1) if match else "?"


def _omegaconf_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "?"
    detail = str(err).splitlines()[0]
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        *parent, leaf = str(key).split(".")
        return f"unknown key '{key}': {suggest(leaf, allowed_keys_at(parent))}"
    return f"{key}: {detail}"


def explain(err: BaseException) -> str | None:
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, MissingConfigException) and getattr(err, "options", None) is not None:
        group = _group_of(err)
        wanted = str(err).split("Could not find '", 1)[-1].split("'", 1)[0].rsplit("/", 1)[-1]
        return f"{group}={wanted} is not a config in conf/{group}/; available: {', '.join(sorted(err.options))}"
    if isinstance(err, ConfigCompositionException):
        cause = err.__cause__
        if isinstance(cause, OmegaConfBaseException):
            return _omegaconf_line(cause)
        return str(err).splitlines()[0]
    if isinstance(err, (OverrideParseException, MissingConfigException)):
        return str(err).splitlines()[0]
    if isinstance(err, OmegaConfBaseException):
        return _omegaconf_line(err)
    return None
