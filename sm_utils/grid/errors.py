"""The grid's error type, and how an exception becomes the text a report shows."""

from __future__ import annotations

import traceback


class GridError(ValueError):
    """A grid specification that cannot be run as it is."""


def describe_error(err: BaseException) -> str:
    """The exception's type and message on the first line, then its traceback."""
    name = type(err).__name__
    if name == "PapermillExecutionError":  # the traceback from inside the notebook
        return f"{err.ename}: {err.evalue}\n" + "\n".join(getattr(err, "traceback", []) or [])
    return f"{name}: {err}\n" + "".join(traceback.format_exception(err))


def error_headline(error: str) -> str:
    """The first non-empty line of an error text (its exception type and message)."""
    return next((line.strip() for line in error.splitlines() if line.strip()), "unknown error")
