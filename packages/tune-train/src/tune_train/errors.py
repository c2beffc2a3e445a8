"""The errors a user can fix, and the one place that turns any error into what a user sees.

Every package raises its own type for problems a user can fix: :class:`ConfigError`
(tune_train.config), :class:`RecipeError`, :class:`EvalError` and :class:`PlotError` (here),
``CheckpointError`` (tune_ckpt) and ``DataError`` (tune_data). Their message is the whole
line to show. :func:`explain` recognises them by type and maps every error, ours or not, to
that line and an exit status; the ``tune`` command and the recipes' ``cli()`` both print
what it returns. (``tune-ckpt`` has its own small mapping: it must work without tune-train.)

This module imports no torch: the ``tune`` command's error path stays quick.
"""

from __future__ import annotations

import errno
import sys

# Exit statuses. Usage mistakes (a bad flag value) are 2, as click and argparse make them.
EXIT_USER_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class RecipeError(Exception):
    """A problem with a run's inputs (checkpoint, device, output folder); the message is what
    the user sees."""


class EvalError(Exception):
    """An evaluation input that cannot be used (an unknown lm-eval task, a file that is not
    text); the message is what the user sees."""


class PlotError(Exception):
    """Nothing to plot, or metrics that cannot be read; the message is what the user sees."""


# No space left on device, disk quota exceeded, over the file size limit (ulimit -f).
_FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def user_errors() -> tuple[type[Exception], ...]:
    """The types whose message alone is the right thing to show a user."""
    from tune_ckpt.errors import CheckpointError
    from tune_train.config import ConfigError

    found: list[type[Exception]] = [ConfigError, RecipeError, EvalError, PlotError,
                                     CheckpointError]
    # Importing tune_data loads torch, which the error path of `tune config show` must not
    # pay for. A DataError can only have been raised once its module is loaded, so look the
    # type up there instead of importing it.
    data_errors = sys.modules.get("tune_data.errors")
    if data_errors is not None:
        found.append(data_errors.DataError)
    return tuple(found)


def explain(error: BaseException) -> tuple[str, int]:
    """The one line to show for an error (without an ``error:`` prefix) and the exit status.

    Args:
        error: Whatever ended the command.

    Returns:
        (message, exit status): our own errors say what to fix and exit 1; files that are
        missing or not allowed name the file; Ctrl-C exits 130; anything else is named as a
        bug to report.
    """
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED
    if isinstance(error, user_errors()):
        return str(error), EXIT_USER_ERROR
    if isinstance(error, FileNotFoundError | PermissionError | IsADirectoryError
                  | NotADirectoryError) and error.filename is not None:
        return f"{error.strerror}: {error.filename}", EXIT_USER_ERROR
    if isinstance(error, OSError) and error.errno in _FULL_DISK:
        # A metrics line, a plot or a log written while the disk fills: the training state
        # written before stays valid, so this is the user's to fix, not a bug.
        where = f": {error.filename}" if error.filename else ""
        return (f"{error.strerror or 'No space left on device'}{where}; free some space (or "
                "write elsewhere) and run it again"), EXIT_USER_ERROR
    if isinstance(error, ImportError) and "pip install" in str(error):
        return str(error), EXIT_USER_ERROR
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    return (f"{type(error).__name__}: {first} (an unexpected error; rerun with --debug for the "
            "traceback and report it)", EXIT_USER_ERROR)
