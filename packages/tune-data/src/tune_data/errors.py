"""The one exception tune-data raises for problems a user can fix."""


class DataError(Exception):
    """Bad data or a bad data setting; the message names the problem and the fix.

    The CLI prints ``str(error)`` as one line and exits non-zero (``--debug`` shows the
    traceback), so the message must stand on its own.
    """
