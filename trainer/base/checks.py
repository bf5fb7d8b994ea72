"""Range and choice rules for config sections, applied the same way by every section that owns keys.

A rule is (dotted key inside the section, test, what would work). Each section (the trainer's, data's,
every model family's) keeps its own table beside its dataclass; these two functions turn a failed rule
into the one line a user reads: the full key, the value and what would work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from trainer.base.errors import UserError

Rule = tuple[str, Callable[[Any], bool], str]


def lookup(node: Any, dotted: str) -> tuple[bool, Any]:
    """(present, value) of a dotted attribute path; absent keys are not checked (another family's rule)."""
    for part in dotted.split("."):
        if not hasattr(node, part):
            return False, None
        node = getattr(node, part)
    return True, node


def check_choices(section: Any, choices: Mapping[str, Iterable[str]], prefix: str = "") -> None:
    for key, allowed in choices.items():
        present, value = lookup(section, key)
        if present and value not in allowed:
            raise UserError(f"{prefix}{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def check_rules(section: Any, rules: Iterable[Rule], prefix: str = "") -> None:
    for key, test, expected in rules:
        present, value = lookup(section, key)
        if present and not test(value):
            raise UserError(f"{prefix}{key}={value!r} is impossible; expected {expected}")
