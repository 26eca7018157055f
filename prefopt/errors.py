"""Errors a user can act on. The CLI turns them into one message on stderr and exit status 2, no traceback."""

from __future__ import annotations


class UserInputError(Exception):
    """Bad input from the user: a config key, a data row, a missing file. The message names what and where."""

    exit_code = 2


class ConfigError(UserInputError):
    """A recipe key that is unknown, has the wrong type, or an invalid value."""


class DataError(UserInputError):
    """A data file or row that cannot be used (message names the file, the line/row and the field)."""
