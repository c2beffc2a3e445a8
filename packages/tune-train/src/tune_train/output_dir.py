"""One training run per output_dir: checked, created and locked before anything is written.

Two runs on one output_dir would replace each other's checkpoints and interleave their
metrics. A run therefore holds an exclusive ``flock`` on ``<output_dir>/.tune.lock`` for its
whole life; the file names the holder (pid and host) so a second run can say who has it. The
operating system drops the lock when the holder exits, however it exits (``kill -9``
included), so a crashed run never blocks the next one. Under torchrun only global rank 0
takes it. ``flock`` works on local disks and on NFS (Linux emulates it with POSIX locks).

output_dir is often under /tmp, where any local user may plant a link at a name tune writes.
No file there is opened through a link: the lock and the append-only logs open with
``O_NOFOLLOW`` and must be regular files (:func:`open_regular`); every other file is written
to a fresh temporary file in the folder and renamed over the name, which replaces a link
rather than writing through it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import time
from pathlib import Path

LOCK_FILE = ".tune.lock"


class OutputDirError(Exception):
    """output_dir cannot be used by this run; the message says why and what to do."""


class OutputDirLock:
    """The held lock; :meth:`release` (or the end of the process) lets the next run in."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __del__(self) -> None:
        self.release()


def claim_output_dir(output_dir: str | Path) -> OutputDirLock:
    """Create output_dir if needed, check it is a writable folder, and lock it.

    Args:
        output_dir: The run's output folder.

    Returns:
        The lock, held until released or until this process exits.

    Raises:
        OutputDirError: If output_dir is a file, cannot be created or written, or another
            run holds it (the message names that run's pid and host).
    """
    path = Path(output_dir)
    _make_folder(path)
    if not os.access(path, os.W_OK | os.X_OK):
        # Also false for root, in a folder on a read-only file system or marked immutable.
        read_only = os.statvfs(path).f_flag & os.ST_RDONLY
        raise OutputDirError(_not_writable(
            path, "read-only file system" if read_only else "no permission to write there"))
    fd = open_regular(path / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        holder = _holder(fd)
        os.close(fd)
        raise OutputDirError(
            f"output_dir {path} is in use by another training run ({holder}); wait for it to "
            "finish, or set another output_dir"
        ) from e
    except OSError as e:
        os.close(fd)
        raise OutputDirError(f"cannot lock output_dir {path} ({e.strerror}); pick a folder on "
                             "a file system that supports file locks") from e
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return OutputDirLock(path / LOCK_FILE, fd)


def open_regular(path: Path, flags: int) -> int:
    """Open (creating it if needed) a file tune writes in a user's folder, never through a
    link and never anything but a regular file.

    Args:
        path: The file.
        flags: ``os.O_RDWR`` or ``os.O_WRONLY | os.O_APPEND``.

    Returns:
        The file descriptor (blocking, close-on-exec).

    Raises:
        OutputDirError: If the name is a link (named, with where it points), a folder, a pipe
            or device, or cannot be opened.
    """
    try:
        # O_NONBLOCK: a fifo planted at the name must not hang the open.
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     0o644)
    except OSError as e:
        if path.is_symlink():
            raise OutputDirError(
                f"{path} is a symbolic link (to {os.readlink(path)}); tune never writes "
                "through a link in an output folder: remove it (someone else may have put it "
                "there), or set another output_dir") from e
        if path.is_dir():
            raise OutputDirError(f"{path} is a folder; tune writes a file of that name there: "
                                 "move it away, or set another output_dir") from e
        raise OutputDirError(_not_writable(path.parent, e.strerror or str(e))) from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputDirError(f"{path} is not a regular file (a pipe or device?); tune writes a "
                             "file of that name there: remove it, or set another output_dir")
    os.set_blocking(fd, True)
    return fd


def _make_folder(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"output_dir {path} is a file, not a folder; set output_dir to a "
                             "folder (or move the file away)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocker is None:
            raise
        raise OutputDirError(f"output_dir {path} cannot be created: {blocker} is a file, not a "
                             "folder; set output_dir to a folder path") from e
    except OSError as e:  # permission denied, read-only file system, ...
        raise OutputDirError(f"cannot create output_dir {path} ({e.strerror}); set output_dir "
                             "to a folder you can write to") from e


def _not_writable(path: Path, reason: str) -> str:
    return (f"output_dir {path} is not writable ({reason}); set output_dir to a folder you "
            "can write to, or change its permissions")


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it ("pid 123 on host")."""
    # The holder writes its name right after taking the lock: give it a moment.
    for _ in range(20):
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.05)
    return "pid unknown"
