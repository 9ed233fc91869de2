"""The error for an optional package a chosen setting needs.

``MissingPackage`` is an ImportError (library callers catching ImportError still do) whose message names the
setting that needs the package and the install command; the command-line tools report it like any other bad
setting (``fastfair.cli.user_errors``: one line, status 2) instead of a traceback, while an ImportError from a
broken installation keeps its traceback.
"""


class MissingPackage(ImportError):
    """An optional package that the chosen setting needs is not importable; the message says how to install it."""
