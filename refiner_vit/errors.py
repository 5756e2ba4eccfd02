"""Errors that mean "the user's input is wrong": the CLI prints them as one line and exits with code 2."""

__all__ = ['UsageError']


class UsageError(Exception):
    """Bad input (flag, file, key, shape, data folder). The message must name the offending thing."""
