"""The one place where an exception of a command becomes a one-line message and an exit code.

Bad input (``ValueError``, which :class:`~pathflow.exceptions.ConfigError` is) exits 2;
a failure pathflow reports on purpose (:class:`~pathflow.exceptions.PathflowError`), a file
that cannot be read or written (``OSError``) or a missing optional package (``ImportError``)
exits 1. Anything else is a bug and keeps its traceback.

Example:
    >>> from pathflow.commands.errors import exit_code, one_line
    >>> exit_code(ValueError("bad")), exit_code(FileNotFoundError("x")), exit_code(KeyError())
    (2, 1, None)
    >>> one_line(ValueError("two\\n  lines"))
    'two lines'
"""

from __future__ import annotations

import sys

from pathflow.exceptions import PathflowError

#: Exit status of bad input (argparse's too) and of a failed run.
EXIT_USAGE = 2
EXIT_FAILED = 1

#: Exceptions reported in one line, most specific first: (classes, exit code).
HANDLED: tuple[tuple[tuple[type[BaseException], ...], int], ...] = (
    ((ValueError,), EXIT_USAGE),
    ((PathflowError, OSError, ImportError), EXIT_FAILED),
)


def exit_code(
    exc: BaseException, extra: tuple[type[BaseException], ...] = (), usage: int = EXIT_USAGE
) -> int | None:
    """The exit status for ``exc``, or ``None`` when it is not a reported error (a bug).
    ``extra``: more exception classes a command reports as failures (exit 1); ``usage``:
    the status of bad input (``pathflow merge`` / ``status`` have always exited 1)."""
    for classes, code in HANDLED:
        if isinstance(exc, classes):
            return usage if code == EXIT_USAGE else code
    return EXIT_FAILED if extra and isinstance(exc, extra) else None


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (whitespace runs collapsed)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def report(
    command: str,
    exc: BaseException,
    extra: tuple[type[BaseException], ...] = (),
    usage: int = EXIT_USAGE,
) -> int:
    """Print ``pathflow COMMAND: error: MESSAGE`` to stderr and return the exit status
    (:func:`exit_code`); re-raise ``exc`` when it is not a reported error."""
    code = exit_code(exc, extra, usage)
    if code is None:
        raise exc
    print(f"pathflow {command}: error: {one_line(exc)}", file=sys.stderr)
    return code


__all__ = ["EXIT_FAILED", "EXIT_USAGE", "HANDLED", "exit_code", "one_line", "report"]
