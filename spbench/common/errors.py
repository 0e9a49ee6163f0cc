"""Errors the CLI turns into one line on stderr and a non-zero exit (no traceback). Imports no torch."""
from __future__ import annotations

from runtime.errors import InputError


class UsageError(InputError):
    """Bad input to the harness (CLI value, suite, results file): says what is wrong and how to fix it. Exit 2."""


class RankError(RuntimeError):
    """A rank failed, died or timed out; the message says which and why. `errors`: rank → its traceback, for
    the ranks that raised (empty when ranks died or timed out). Exit 1."""

    def __init__(self, message: str, errors: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.errors = dict(errors or {})


def need_positive(**values: float | None) -> None:
    """UsageError naming the first CLI value that is given but not > 0, e.g. need_positive(timeout=-5)."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {value:g}")
