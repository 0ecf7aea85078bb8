"""Exceptions that carry the exit code the CLI should use.

Library code raises these; `rnnlm.cli` turns them into one clear message and an exit
code, never a traceback (unless `--debug`).
"""

from __future__ import annotations


class RnnlmError(Exception):
    """Base class of the errors rnnlm reports to users."""

    exit_code = 1


class UsageError(RnnlmError):
    """Bad usage or bad input: a missing file, bad YAML, a bad value, an unreadable checkpoint.

    The message says what is wrong and, where it can, how to fix it. Exit code 2.
    """

    exit_code = 2


class RunError(RnnlmError):
    """A failure while running (e.g. the loss became NaN, the disk filled up). Exit code 1."""

    exit_code = 1
