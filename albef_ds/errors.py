"""Error types whose message is meant for the user as it stands: the CLI prints it on one
line (naming the key, file or row) and exits with status 2, no traceback."""
from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user: a config value, a path, a file's content."""


class ConfigError(UsageError, ValueError):
    """A configuration problem; the message names the key and, when known, the file."""
