"""The one exception type for a user's mistake, and how any error is told in one line."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix from the message alone; printed as one line, never a traceback."""


def one_line(err: BaseException, with_type: bool = False) -> str:
    """The first line of an error's message (refusals, log lines, a failed job's row in a sweep report).
    with_type prefixes the exception's class name, which says what kind of failure a bare message cannot."""
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    return f"{type(err).__name__}: {lines[0]}" if with_type else lines[0]
