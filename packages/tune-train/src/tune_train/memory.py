"""Process memory settings a run may need (Linux, glibc)."""

from __future__ import annotations

import ctypes
import sys

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
_MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_blocks_to_os() -> bool:
    """Make glibc serve every allocation of 1 MiB or more with its own mmap (Linux only).

    An NF4 base on CPU dequantises each weight for each matmul, forward and backward: many
    short-lived blocks of tens of MB between the long-lived activations. glibc's default
    (its mmap threshold rises to 32 MB after the first large free) puts them on the heap,
    where the freed ones cannot go back to the OS while a live block sits above them; a
    QLoRA step of an 8B model then holds ~1.5 GB more than it uses. With the threshold fixed
    at 1 MiB each such block is unmapped when freed. Same effect as the environment variable
    MALLOC_MMAP_THRESHOLD_=1048576, which only works when set before the process starts.

    Returns:
        Whether the setting was applied (False off glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
