"""Error types whose message is meant for the user as it stands: the CLI prints it on one
line (naming the key, file or row) and exits with status 2, no traceback."""
from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user: a config value, a path, a file's content."""


class ConfigError(UsageError, ValueError):
    """A configuration problem; the message names the key and, when known, the file."""


class Interrupted(Exception):
    """A stop signal ended work that has no checkpoint to take (an evaluation): the message
    says so on one line; the CLI prints it and exits :attr:`exit_status`."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(message)
        self.signal_name = signal_name

    @property
    def exit_status(self) -> int:
        """128 + the signal's number: what a shell reports for a process that signal ended."""
        import signal
        return 128 + signal.Signals[self.signal_name].value
