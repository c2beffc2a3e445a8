"""Packing: samples placed into fixed-length rows so no compute goes to padding."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from tune_data.dataset import IGNORE_INDEX
from tune_data.errors import DataError


def plan_rows(lengths: Sequence[int] | np.ndarray, row_len: int) -> list[list[int]]:
    """Best-fit decreasing: which samples go into which row.

    Longest first, each into the fullest row that still has room, else a new row. Alpaca at
    512 tokens fills rows 98.5% (filling in order: 84.5%), and the plan is a pure function of
    the lengths, so every rank computes the same one.

    Args:
        lengths: Length of each sample, each at most ``row_len``.
        row_len: Tokens per row.

    Returns:
        Sample indices of each row, in the order they are laid out.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > row_len:
        raise ValueError(f"a sample of {lengths.max()} tokens does not fit rows of {row_len}")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row number), ascending
    for index in np.argsort(-lengths, kind="stable").tolist():
        need = int(lengths[index])
        slot = bisect.bisect_left(free, (need, -1))
        if slot == len(free):
            rows.append([index])
            space, row = row_len - need, len(rows) - 1
        else:
            space, row = free.pop(slot)
            rows[row].append(index)
            space -= need
        if space > 0:
            bisect.insort(free, (space, row))
    return rows


class PackedDataset(Dataset):
    """A dataset packed into rows of exactly ``max_seq_len`` tokens.

    ``packed[r]`` has ``tokens``, ``labels`` (each sample's last position -100, so no loss
    crosses a boundary) and ``input_pos`` (positions restart at 0 for every sample; the tail
    of padding is one more document). :func:`tune_data.collate` turns ``input_pos`` into the
    block-diagonal causal ``mask``, so the model computes exactly the per-sample losses.

    A sample longer than a row is cut to the row, as the dataset's own truncation does (its
    last position loses its target); one left with no loss tokens is dropped.

    Args:
        dataset: Samples with ``tokens`` and ``labels`` (e.g. a TokenizedDataset).
        max_seq_len: Tokens per row.
        pad_id: Padding token id; default: the dataset's tokenizer's, else 0.
    """

    def __init__(self, dataset: Dataset, max_seq_len: int, pad_id: int | None = None):
        if max_seq_len < 2:
            raise DataError(f"packing needs rows of at least 2 tokens, got {max_seq_len}")
        self.dataset = dataset
        self.max_seq_len = max_seq_len
        tokenizer = getattr(dataset, "tokenizer", None)
        self.pad_id = pad_id if pad_id is not None else getattr(tokenizer, "pad_id", 0)
        self.tokenizer = tokenizer
        lengths = getattr(dataset, "lengths", None)
        if lengths is None:
            lengths = [len(dataset[i]["tokens"]) for i in range(len(dataset))]
        lengths = np.asarray(lengths, dtype=np.int64)
        keep = np.ones(len(lengths), dtype=bool)
        too_long = np.flatnonzero(lengths > max_seq_len)
        for i in too_long.tolist():
            labels = dataset[i]["labels"]
            keep[i] = bool((torch.as_tensor(labels[: max_seq_len - 1]) != IGNORE_INDEX).any())
        self.truncated = int(keep[too_long].sum())
        self.dropped = int((~keep).sum())
        self.samples = np.flatnonzero(keep)  # dataset indices that were packed
        fitted = np.minimum(lengths[self.samples], max_seq_len)
        self.bins = [self.samples[row] for row in plan_rows(fitted, max_seq_len)]
        self.lengths = np.full(len(self.bins), max_seq_len, dtype=np.int64)
        self.real_tokens = int(fitted.sum())

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        t = self.max_seq_len
        tokens = torch.full((t,), self.pad_id, dtype=torch.long)
        labels = torch.full((t,), IGNORE_INDEX, dtype=torch.long)
        input_pos = torch.empty(t, dtype=torch.long)
        start = 0
        for i in self.bins[index].tolist():
            sample = self.dataset[i]
            n = min(len(sample["tokens"]), t)
            tokens[start : start + n] = torch.as_tensor(sample["tokens"][:n])
            labels[start : start + n] = torch.as_tensor(sample["labels"][:n])
            labels[start + n - 1] = IGNORE_INDEX  # no target across the boundary (or a cut)
            input_pos[start : start + n] = torch.arange(n)
            start += n
        input_pos[start:] = torch.arange(t - start)  # the padding tail: its own document
        return {"tokens": tokens, "labels": labels, "input_pos": input_pos}

    @property
    def fill(self) -> float:
        """Fraction of row positions holding real tokens."""
        return self.real_tokens / max(len(self) * self.max_seq_len, 1)

    def __repr__(self) -> str:
        return (
            f"PackedDataset(rows={len(self)}, max_seq_len={self.max_seq_len}, "
            f"samples={len(self.samples)}, fill={self.fill:.1%})"
        )


def pack(dataset: Dataset, max_seq_len: int, pad_id: int | None = None) -> PackedDataset:
    """Pack a dataset into rows of ``max_seq_len`` tokens; see :class:`PackedDataset`.

    Args:
        dataset: Samples with ``tokens`` and ``labels``.
        max_seq_len: Tokens per row.
        pad_id: Padding token id (default: the dataset's tokenizer's, else 0).

    Returns:
        The packed dataset.
    """
    return PackedDataset(dataset, max_seq_len, pad_id)
