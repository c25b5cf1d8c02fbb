"""Errors that reach the user as one line: bad input (exit code 2) and a run stopped by a failure (exit code 3)."""


class UserError(Exception):
    """Bad user input: one-line message naming the problem and the fix; exit code 2."""


class RunStopped(Exception):
    """A run that cannot go on (a non-finite loss): one-line message saying where, what was kept and what to
    try; exit code 3."""
