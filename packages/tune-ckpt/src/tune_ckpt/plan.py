"""Lazy tensors: what a conversion will write, known before any weight is read.

A conversion is a list of :class:`TensorPlan` (output name, shape, dtype and a function that
makes the tensor). Shapes come from file headers, so every key and shape is checked before the
first byte is written, and the writer can lay out a file's header up front and then stream the
tensors one by one. A :class:`TensorSource` is the read side: a name -> tensor mapping whose
tensors are usually views of an mmap'd file, so reading one touches only its own pages.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch


def _noop() -> None:
    pass


class FileRange(NamedTuple):
    """A run of bytes in a file, with their CRC-32 when the file's index records it."""

    path: str
    offset: int
    length: int
    crc: int | None = None


def slice_ranges(ranges: list[FileRange], start: int, stop: int) -> list[FileRange]:
    """Bytes [start, stop) of the concatenation of ``ranges``, as ranges."""
    out, pos = [], 0
    for r in ranges:
        lo, hi = max(start, pos), min(stop, pos + r.length)
        if lo < hi:
            whole = lo == pos and hi == pos + r.length
            out.append(FileRange(r.path, r.offset + lo - pos, hi - lo, r.crc if whole else None))
        pos += r.length
    return out


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor, described before it exists.

    Attributes:
        key: Name in the output state dict.
        shape: Shape of the tensor ``make`` returns.
        dtype: Its dtype.
        make: Builds the tensor (reads, concatenates, permutes or casts source tensors).
        release: Called once the tensor is written, to drop the source pages it read.
        ranges: When the tensor's bytes are runs of source-file bytes laid end to end (a
            renamed tensor, or Meta's wq, wk, wv fused into wqkv), returns those runs, and the
            writer copies them file to file in the kernel without reading them into memory.
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]
    release: Callable[[], None] = field(default=_noop, compare=False)
    ranges: Callable[[], list[FileRange] | None] | None = field(default=None, compare=False)

    def file_ranges(self) -> list[FileRange] | None:
        found = self.ranges() if self.ranges is not None else None
        if found is None or sum(r.length for r in found) != self.nbytes:
            return None
        return found

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


# --- page release for mmap'd sources ----------------------------------------------------------

_MADV_WILLNEED, _MADV_DONTNEED = 3, 4
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _madvise(tensor: torch.Tensor, advice: int) -> None:
    if _libc is None or tensor.numel() == 0:
        return
    # Never past the tensor's storage: a view need not be contiguous (a zero-stride expand
    # spans one element), and dropping pages beyond the file mapping would zero other memory.
    storage = tensor.untyped_storage()
    start = max(tensor.data_ptr(), storage.data_ptr())
    end = min(tensor.data_ptr() + tensor.numel() * tensor.element_size(),
              storage.data_ptr() + storage.nbytes())
    if end <= start:
        return
    # Round outwards to whole pages: the mapping itself is page-aligned, so this stays inside it.
    start &= ~(mmap.PAGESIZE - 1)
    end = (end + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice)


class TensorSource:
    """A read-only name -> tensor mapping whose shapes are known without reading data."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def where(self, key: str) -> str:
        """Where the key lives, for error messages (a file name)."""
        return "the state dict"

    def release(self, *keys: str) -> None:
        """Drop the pages these keys occupy in memory (they are re-read if asked for again)."""

    def file_ranges(self, key: str) -> list[FileRange] | None:
        """The file bytes that hold this tensor as it is, if it is stored contiguously."""
        return None


class DictSource(TensorSource):
    """Tensors held in a dict, optionally views of mmap'd files.

    Args:
        tensors: The tensors by name.
        files: Optional name -> file name, for error messages.
        ranges: For tensors stored contiguously in a file nobody has modified since it was
            mapped, where their bytes are (see :attr:`TensorPlan.ranges`).
        mapped: True (or the set of keys) only for tensors that are views of a read-only
            file mapping. For those ``release`` tells the kernel to drop the pages (they stay
            in the page cache), which keeps resident memory flat while a 13 GB file streams
            through. Never set it for tensors in ordinary memory: dropping those pages would
            zero them.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        files: Mapping[str, str] | None = None,
        mapped: bool | Collection[str] = False,
        ranges: Mapping[str, FileRange] | None = None,
    ):
        self._tensors = dict(tensors)
        self._files = dict(files or {})
        self._ranges = dict(ranges or {})
        self._mapped = set(self._tensors) if mapped is True else set(mapped or ())

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def get(self, key: str) -> torch.Tensor:
        tensor = self._tensors[key]
        if key in self._mapped:
            _madvise(tensor, _MADV_WILLNEED)  # start reading ahead while the last tensor writes
        return tensor

    def where(self, key: str) -> str:
        return self._files.get(key, "the state dict")

    def release(self, *keys: str) -> None:
        for key in keys:
            if key in self._mapped:
                _madvise(self._tensors[key], _MADV_DONTNEED)

    def file_ranges(self, key: str) -> list[FileRange] | None:
        return [self._ranges[key]] if key in self._ranges else None


class PlanSource(TensorSource):
    """The output of one conversion seen as the input of the next (e.g. Meta -> native -> HF)."""

    def __init__(self, plans: Iterable[TensorPlan], where: str = "the converted state dict"):
        self._plans = {plan.key: plan for plan in plans}
        self._where = where

    def keys(self) -> list[str]:
        return list(self._plans)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._plans[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._plans[key].dtype

    def get(self, key: str) -> torch.Tensor:
        return self._plans[key].make()

    def where(self, key: str) -> str:
        return self._where

    def release(self, *keys: str) -> None:
        for key in keys:
            self._plans[key].release()

    def file_ranges(self, key: str) -> list[FileRange] | None:
        return self._plans[key].file_ranges()


class RenamedSource(TensorSource):
    """Some tensors of another source under new names (a multimodal checkpoint's language
    model seen as the text model's checkpoint).

    Args:
        source: The tensors.
        names: New name -> the source's name, for the tensors to show; the others are hidden.
    """

    def __init__(self, source: TensorSource, names: Mapping[str, str]):
        self._source = source
        self._names = dict(names)

    def keys(self) -> list[str]:
        return list(self._names)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._source.shape(self._names[key])

    def dtype(self, key: str) -> torch.dtype:
        return self._source.dtype(self._names[key])

    def get(self, key: str) -> torch.Tensor:
        return self._source.get(self._names[key])

    def where(self, key: str) -> str:
        return self._source.where(self._names[key])

    def release(self, *keys: str) -> None:
        self._source.release(*(self._names[k] for k in keys))

    def file_ranges(self, key: str) -> list[FileRange] | None:
        return self._source.file_ranges(self._names[key])


def materialize(plans: Iterable[TensorPlan]) -> dict[str, torch.Tensor]:
    """Make every planned tensor: the in-memory form of a conversion."""
    return {plan.key: plan.make() for plan in plans}


def cast_plans(plans: list[TensorPlan], dtype: torch.dtype | None) -> list[TensorPlan]:
    """Plans whose floating-point tensors come out as ``dtype`` (None: unchanged)."""
    if dtype is None:
        return plans
    out = []
    for plan in plans:
        if plan.dtype.is_floating_point and plan.dtype != dtype:
            # A cast changes the bytes: no file ranges to copy any more.
            plan = TensorPlan(
                plan.key, plan.shape, dtype, lambda make=plan.make: make().to(dtype), plan.release
            )
        out.append(plan)
    return out
