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

import torch


def _noop() -> None:
    pass


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor, described before it exists.

    Attributes:
        key: Name in the output state dict.
        shape: Shape of the tensor ``make`` returns.
        dtype: Its dtype.
        make: Builds the tensor (reads, concatenates, permutes or casts source tensors).
        release: Called once the tensor is written, to drop the source pages it read.
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]
    release: Callable[[], None] = field(default=_noop, compare=False)

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
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
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


class DictSource(TensorSource):
    """Tensors held in a dict, optionally views of mmap'd files.

    Args:
        tensors: The tensors by name.
        files: Optional name -> file name, for error messages.
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
    ):
        self._tensors = dict(tensors)
        self._files = dict(files or {})
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
            plan = TensorPlan(
                plan.key, plan.shape, dtype, lambda make=plan.make: make().to(dtype), plan.release
            )
        out.append(plan)
    return out
