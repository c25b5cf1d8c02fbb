"""Errors that reach the user as one line: bad input (exit code 2), a run stopped by a failure (exit code 3) and a
run stopped by a signal after saving where it was (exit code 128 + signal: 130 for SIGINT, 143 for SIGTERM)."""


class UserError(Exception):
    """Bad user input: one-line message naming the problem and the fix; exit code 2."""


class RunStopped(Exception):
    """A run that cannot go on (a non-finite loss, a full disk): one-line message saying where, what was kept and
    what to try; exit code 3."""


class DiskFull(RunStopped):
    """No space left while writing: the message names the folder and what was kept; the command line adds how to
    continue (the resume command of a training run)."""


class RunInterrupted(Exception):
    """A run stopped on request (SIGINT, SIGTERM) after writing a recovery point; exit code ``128 + signal``."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
