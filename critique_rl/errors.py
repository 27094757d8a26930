"""User-facing errors: each names the bad field or input, the value, and the fix.

The CLI turns any :class:`UserError` into one line on stderr and exit code 2 (no traceback).
"""

from __future__ import annotations

import reprlib

MAX_VALUE_CHARS = 120
"""Longest rendering of a bad value inside an error message (a 25 MB list is shown as its first items)."""

_repr = reprlib.Repr()
_repr.maxlevel = 3  # bounded depth: a YAML alias bomb (a DAG of shared lists) is never expanded
_repr.maxlist = _repr.maxtuple = _repr.maxset = _repr.maxdict = 6
_repr.maxstring = _repr.maxother = MAX_VALUE_CHARS
_repr.maxlong = 40


def short_repr(value: object, max_chars: int = MAX_VALUE_CHARS) -> str:
    """``repr(value)`` bounded in time and length (depth, items per container and characters are capped)."""
    try:
        text = _repr.repr(value)
    except Exception:  # a value whose repr fails still gets a message
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


class UserError(Exception):
    """An error caused by user input (config, flags, files). Printed as one line by the CLI."""


class ConfigError(UserError, ValueError):
    """A config field has a bad value. The message names the field, the value and the fix."""

    def __init__(self, field: str, value: object, fix: str) -> None:
        self.field = field
        self.value = value
        self.fix = fix
        super().__init__(f"config field '{field}' = {short_repr(value)}: {fix}")
