"""The one exception type for a user's mistake."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix from the message alone; printed as one line, never a traceback."""
