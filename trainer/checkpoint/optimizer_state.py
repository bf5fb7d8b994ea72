"""Optimizer state keyed by parameter name instead of position, so a checkpoint survives regrouped parameters.

A positional state dict silently gives one parameter's moments to another when groups are ordered differently;
by name, a renamed, added or untrained parameter is refused instead of resumed with fresh moments.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from trainer.base.errors import UserError
from trainer.checkpoint.full import normalise

log = logging.getLogger(__name__)


def _names_by_identity(named_params: dict[str, torch.nn.Parameter]) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, param in named_params.items():
        names.setdefault(id(param), name)  # tied parameters: the first name is the canonical one
    return names


def _optimizer_param_names(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[list[str]]:
    grouped = []
    for group in optimizer.param_groups:
        members = []
        for param in group["params"]:
            if id(param) not in names:
                raise ValueError(f"optimizer holds a parameter of shape {tuple(param.shape)} that is not in "
                                 "named_params; pass model.named_parameters() of the optimised model")
            members.append(names[id(param)])
        grouped.append(members)
    return grouped


def optimizer_state_to_named(
    optimizer: torch.optim.Optimizer, named_params: dict[str, torch.nn.Parameter]
) -> dict[str, Any]:
    """Optimizer state keyed by parameter name instead of position, with each group's hyperparameters."""
    positional = optimizer.state_dict()
    grouped_names = _optimizer_param_names(optimizer, _names_by_identity(named_params))
    state: dict[str, Any] = {}
    groups = []
    for saved_group, names in zip(positional["param_groups"], grouped_names, strict=False):
        for index, name in zip(saved_group["params"], names, strict=False):
            if index in positional["state"]:
                state[name] = positional["state"][index]
        hyper = {key: value for key, value in saved_group.items() if key not in ("params", "param_names")}
        groups.append({**hyper, "params": list(names)})
    return {"state": state, "param_groups": groups}


def _same_value(first: Any, second: Any) -> bool:
    if isinstance(first, torch.Tensor) or isinstance(second, torch.Tensor):
        return torch.equal(torch.as_tensor(first), torch.as_tensor(second))
    return normalise(first) == normalise(second)


# Group entries that are not settings: the lr (and its base) belong to the scheduler, the rest is bookkeeping.
_NOT_SETTINGS = ("params", "param_names", "names", "role", "lr", "initial_lr")
_OPTIM_KEYS = {"weight_decay": "optim.weight_decay", "betas": "optim.beta1/beta2", "eps": "optim.eps"}


def optimizer_state_from_named(
    optimizer: torch.optim.Optimizer, named_state: dict[str, Any], named_params: dict[str, torch.nn.Parameter]
) -> None:
    """Load state saved by optimizer_state_to_named into `optimizer`, however its groups are ordered.

    Each parameter takes the state and hyperparameters of the group it belonged to when saved; a group
    of this optimizer whose members were saved with different hyperparameters cannot be represented and
    is refused. Names must match both ways, so a renamed or added parameter never resumes silently
    with fresh moments.
    """
    grouped_names = _optimizer_param_names(optimizer, _names_by_identity(named_params))
    current_names = {name for names in grouped_names for name in names}

    saved_group_of: dict[str, int] = {}
    for group_index, group in enumerate(named_state["param_groups"]):
        for name in group["params"]:
            saved_group_of[name] = group_index
    for name in list(saved_group_of) + list(named_state["state"]):
        if name not in named_params:
            raise UserError(f"the checkpoint's optimizer state names parameter '{name}', which this model does "
                            "not have; resume with the architecture the checkpoint was trained with "
                            "or start a fresh run")
        if name not in current_names:
            raise UserError(f"the checkpoint's optimizer state names parameter '{name}', which this run's "
                            "optimizer does not train; resume with the same trainable parameters or start "
                            "a fresh run")
    for name in sorted(current_names - set(saved_group_of)):
        raise UserError(f"parameter '{name}' has no optimizer state in the checkpoint (new or renamed?); "
                        "resume with the architecture the checkpoint was trained with or start a fresh run")

    positional_state: dict[int, Any] = {}
    positional_groups = []
    index = 0
    for group, names in zip(optimizer.param_groups, grouped_names, strict=False):
        hyper: dict[str, Any] | None = None
        hyper_source = ""
        for name in names:
            saved = {k: v for k, v in named_state["param_groups"][saved_group_of[name]].items() if k != "params"}
            if hyper is None:
                hyper, hyper_source = saved, name
            else:
                for key in sorted(set(hyper) | set(saved)):
                    if not _same_value(hyper.get(key), saved.get(key)):
                        raise UserError(f"parameters '{hyper_source}' and '{name}' share an optimizer group here "
                                        f"but were saved with {key}={hyper.get(key)!r} and {saved.get(key)!r}; "
                                        "group parameters as the checkpoint did or start a fresh run")
            if name in named_state["state"]:
                positional_state[index] = named_state["state"][name]
            index += 1
        if hyper is None:  # an empty group keeps its own settings
            hyper = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        positional_groups.append({**hyper, "params": list(range(index - len(names), index))})
    # Settings travel with each parameter's state (above), so an optim.* edited for the resumed run does not
    # apply; say so rather than ignore it silently. (The lr is the scheduler's and does follow the config.)
    configured = [{k: v for k, v in group.items() if k not in _NOT_SETTINGS} for group in optimizer.param_groups]
    optimizer.load_state_dict({"state": positional_state, "param_groups": positional_groups})
    kept = sorted({f"{_OPTIM_KEYS.get(key, key)}={group[key]!r} (this run's config: {value!r})"
                   for group, settings in zip(optimizer.param_groups, configured, strict=True)
                   for key, value in settings.items() if key in group and not _same_value(group[key], value)})
    if kept:
        log.warning("resuming keeps the checkpoint's optimizer settings: %s; start a fresh run to change them",
                    "; ".join(kept))
