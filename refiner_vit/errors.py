"""Errors the command line reports as one line: bad input (exit code 2) and an interrupted run (exit code 130)."""

__all__ = ['RunInterruptedError', 'UploadError', 'UsageError']


class UsageError(Exception):
    """Bad input (flag, file, key, shape, data folder). The message must name the offending thing."""


class RunInterruptedError(Exception):
    """Ctrl-C. The message says what was kept and how to continue."""


class UploadError(ValueError):
    """A file given to ``refiner app`` that it refuses: too many bytes or pixels, or not an image. The message is
    shown in the page and names the file."""
