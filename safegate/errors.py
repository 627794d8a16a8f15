"""Errors every layer may raise: `CLIError` is a user's mistake on the command line (one line, exit status 2).

Example:
    >>> str(CLIError("`--model` is required"))
    '`--model` is required'
"""


class CLIError(Exception):
    """A user error: printed as one line, exit status 2, no traceback."""
