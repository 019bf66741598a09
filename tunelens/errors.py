"""The one error type users see: a readable line, never a traceback."""


class TunelensError(Exception):
    """Bad input or a failed precondition, worded as what to do; the CLI prints it and exits 2."""

    exit_code = 2


def one_line(exc: BaseException, limit: int = 500) -> str:
    """An exception as one readable line (a status tag, a log line): its message, whitespace
    collapsed, prefixed by its type unless it is a TunelensError, cut at `limit` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, TunelensError):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 1] + "…"
