"""The one exception type mixret raises for bad input; the CLI prints its message and exits 1."""


class MixretError(Exception):
    """Bad input or state the user can fix: the message says what, where and what was expected."""


def where(path, line=None) -> str:
    """`path` or `path:line`, for error messages."""
    return f"{path}:{line}" if line is not None else str(path)
