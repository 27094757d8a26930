"""User-facing errors: each names the bad field or input, the value, and the fix.

The CLI turns any :class:`UserError` into one line on stderr and exit code 2 (no traceback).
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by user input (config, flags, files). Printed as one line by the CLI."""


class ConfigError(UserError, ValueError):
    """A config field has a bad value. The message names the field, the value and the fix."""

    def __init__(self, field: str, value: object, fix: str) -> None:
        self.field = field
        self.value = value
        self.fix = fix
        super().__init__(f"config field '{field}' = {value!r}: {fix}")
