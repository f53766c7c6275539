"""User-input errors: one line naming the file, field or value and what would be valid."""

from __future__ import annotations

#: Exit code of the entry points for bad input (checked before any model is built).
EXIT_BAD_INPUT = 2


class InputError(ValueError):
    """Bad user input. ``str(err)`` is the one-line message shown to the user."""
