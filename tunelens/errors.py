"""The one error type users see: a readable line, never a traceback."""


class TunelensError(Exception):
    """Bad input or a failed precondition, worded as what to do; the CLI prints it and exits 2."""

    exit_code = 2
