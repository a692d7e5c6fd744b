"""Errors raised for bad user input, and how a command-line run reports them.

Each carries one line that names the file or datalist item, what is wrong and what was
expected, so a command-line run can print it and exit non-zero without a traceback wall.
"""

from __future__ import annotations

import os
import sys

# Set to 1 to see the whole traceback of an input error (e.g. when reporting a bug).
FULL_TRACEBACK_ENV = "ATTRIBUTION_BUNDLES_TRACEBACK"


class InputError(ValueError):
    """Bad user input: a datalist, an image file or a command-line value."""


class DatalistError(InputError):
    """A datalist file or one of its items does not follow the data contract."""


class ImageFileError(InputError):
    """An image file cannot be read or does not have the expected content."""


def input_error_in(error: BaseException | None) -> InputError | None:
    """The :class:`InputError` behind ``error``, if any.

    MONAI re-raises what a config expression or a transform raised inside its own ``RuntimeError``
    ("Failed to evaluate ...", "applying transform ..."), so the user's problem is down the chain.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, InputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _report_input_error(exc_type, exc, tb, fallback=sys.__excepthook__):
    problem = input_error_in(exc)
    if problem is None or os.environ.get(FULL_TRACEBACK_ENV) == "1":
        fallback(exc_type, exc, tb)
        return
    print(f"error: {problem}", file=sys.stderr)
    print(f"(set {FULL_TRACEBACK_ENV}=1 for the full traceback)", file=sys.stderr)


def install_input_error_report() -> None:
    """Make an uncaught :class:`InputError` end a run with its one line instead of a traceback.

    Python still exits with status 1. Only replaces the interpreter's default hook, so IPython,
    pytest or an application that installed its own keep theirs; other exceptions keep their traceback.
    """
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _report_input_error
