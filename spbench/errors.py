"""Errors the CLI turns into one line on stderr and a non-zero exit (no traceback)."""


class UsageError(Exception):
    """Bad input (config, data, CLI value): the message says what is wrong and how to fix it. Exit 2."""
