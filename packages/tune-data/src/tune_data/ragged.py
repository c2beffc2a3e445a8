"""Ragged arrays (many id lists as one flat array plus offsets): the datasets' workhorse."""

from __future__ import annotations

from itertools import chain

import numpy as np


def flatten(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids as one flat int32 array and (N + 1,) int64 offsets."""
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, lists), dtype=np.int64, count=len(lists)), out=offsets[1:])
    flat = np.fromiter(chain.from_iterable(lists), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


def gather(
    source: np.ndarray, starts: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Slices ``source[starts[i]:starts[i] + lengths[i]]`` joined, and their (N + 1,) offsets.

    One vectorised index instead of a Python loop over slices.
    """
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    index = np.arange(offsets[-1], dtype=np.int64)
    index += np.repeat(starts - offsets[:-1], lengths)
    return source[index], offsets
