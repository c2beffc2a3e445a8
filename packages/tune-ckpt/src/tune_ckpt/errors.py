"""The one error type tune-ckpt raises for problems a user can fix."""

from __future__ import annotations


class CheckpointError(Exception):
    """A checkpoint, a download or an argument is not what tune-ckpt needs.

    The message is the single line a user sees: it names the problem and, where there is one,
    the fix. The command-line tools print it without a traceback (``--debug`` shows one).
    """
