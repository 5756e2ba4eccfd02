"""Errors the command line reports as one line: bad input (exit code 2) and an interrupted run (exit code 130)."""

__all__ = ['RunInterruptedError', 'UsageError']


class UsageError(Exception):
    """Bad input (flag, file, key, shape, data folder). The message must name the offending thing."""


class RunInterruptedError(Exception):
    """Ctrl-C. The message says what was kept and how to continue."""
