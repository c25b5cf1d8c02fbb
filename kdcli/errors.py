"""Errors that reach the user as one line and exit code 2."""


class UserError(Exception):
    """Bad user input: one-line message naming the problem and the fix; exit code 2."""
