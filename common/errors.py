"""Errors raised for bad user input.

Each carries one line that names the file or datalist item, what is wrong and what was
expected, so a command-line run can print it and exit non-zero without a traceback wall.
"""


class InputError(ValueError):
    """Bad user input: a datalist, an image file or a command-line value."""


class DatalistError(InputError):
    """A datalist file or one of its items does not follow the data contract."""


class ImageFileError(InputError):
    """An image file cannot be read or does not have the expected content."""
