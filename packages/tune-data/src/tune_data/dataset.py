"""A tokenized dataset held as flat arrays: fast indexing, lengths for free."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tune_data.tokenizer import Llama2Tokenizer

if TYPE_CHECKING:
    import datasets

IGNORE_INDEX = -100  # label of positions that take no loss (the Batch contract)


def shifted_labels(tokens: np.ndarray, prompt_len: int) -> np.ndarray:
    """Next-token targets of one sample: ``labels[i]`` is the target for ``tokens[i]``.

    Args:
        tokens: (L,) token ids.
        prompt_len: Tokens ``tokens[:prompt_len]`` are never targets (the masked prompt).

    Returns:
        (L,) int64 labels, -100 on the last position and where the target is in the prompt.
    """
    labels = np.full(len(tokens), IGNORE_INDEX, dtype=np.int64)
    start = max(prompt_len - 1, 0)  # position i predicts tokens[i + 1]
    labels[start:-1] = tokens[start + 1 :]
    return labels


def _all_labels(
    tokens: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, prompt_len: np.ndarray
) -> np.ndarray:
    """:func:`shifted_labels` of every sample at once, flat int32 like the tokens.

    Made once (milliseconds for millions of tokens) so that fetching a sample is two slices.
    """
    labels = np.full(len(tokens), IGNORE_INDEX, dtype=np.int32)
    labels[:-1] = tokens[1:]
    starts = np.repeat(offsets[:-1].astype(np.int64), lengths)
    position = np.arange(len(tokens), dtype=np.int64) - starts  # index within its sample
    labels[position < np.repeat(np.maximum(prompt_len - 1, 0), lengths)] = IGNORE_INDEX
    labels[offsets[1:][lengths > 0] - 1] = IGNORE_INDEX  # last position: nothing follows
    return labels


class TokenizedDataset(Dataset):
    """Samples of token ids with a masked prompt prefix, ready for :func:`tune_data.collate`.

    ``dataset[i]`` is ``{"tokens": (L,) int64, "labels": (L,) int64}`` with labels already
    shifted (``labels[j]`` is the target for ``tokens[j]``, -100 where no loss is taken).
    All token ids live in one flat int32 array with offsets, so indexing costs a slice and
    :attr:`lengths` (for length grouping and packing) costs nothing.

    Args:
        tokens: Flat int32 token ids of all samples.
        offsets: (N + 1,) start of each sample in ``tokens``.
        prompt_len: (N,) masked prefix length of each sample.
        rows: (N,) the source record each sample came from.
        truncated: (N,) whether the sample was cut to ``max_seq_len``.
        tokenizer: The tokenizer that made it (to decode samples).
        name: What the data is, for reports (a file or hub name).
        source_rows: Records in the source (to count dropped ones).
        max_seq_len: The length samples were cut to (None: not cut).
        hf_dataset: The cached ``datasets.Dataset`` the arrays were read from, if any.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        offsets: np.ndarray,
        prompt_len: np.ndarray,
        rows: np.ndarray,
        truncated: np.ndarray,
        *,
        tokenizer: Llama2Tokenizer | None = None,
        name: str = "",
        source_rows: int | None = None,
        max_seq_len: int | None = None,
        hf_dataset: datasets.Dataset | None = None,
    ):
        self._tokens = tokens
        self._offsets = offsets
        self.prompt_len = prompt_len
        self.rows = rows
        self.truncated = truncated
        self.lengths = np.diff(offsets)
        self.tokenizer = tokenizer
        self.name = name
        self.source_rows = len(prompt_len) if source_rows is None else source_rows
        self.max_seq_len = max_seq_len
        self.hf_dataset = hf_dataset
        self._labels = _all_labels(tokens, offsets, self.lengths, prompt_len)

    @classmethod
    def from_hf(cls, ds: datasets.Dataset, **kwargs: Any) -> TokenizedDataset:
        """From the columns ``tokens``, ``prompt_len``, ``row``, ``truncated`` of a dataset."""
        table = ds.with_format("arrow")[:]  # honours any indices mapping; no copy otherwise
        tokens_col = table.column("tokens").combine_chunks()
        offsets = tokens_col.offsets.to_numpy().astype(np.int64)
        values = tokens_col.values.to_numpy()
        # A sliced list array shares its parent's buffers: rebase to this slice.
        values, offsets = values[offsets[0] : offsets[-1]], offsets - offsets[0]

        def column(name: str, dtype: type) -> np.ndarray:
            return table.column(name).to_numpy().astype(dtype, copy=False)

        return cls(
            np.array(values, dtype=np.int32), offsets,  # a writable copy, off Arrow's buffer
            column("prompt_len", np.int64), column("row", np.int64),
            column("truncated", np.bool_), hf_dataset=ds, **kwargs,
        )

    def __len__(self) -> int:
        return len(self.lengths)

    def token_ids(self, index: int) -> np.ndarray:
        """(L,) int32 token ids of one sample."""
        return self._tokens[self._offsets[index] : self._offsets[index + 1]]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range (dataset has {len(self)})")
        start, end = self._offsets[index], self._offsets[index + 1]
        return {
            "tokens": torch.from_numpy(self._tokens[start:end]).long(),
            "labels": torch.from_numpy(self._labels[start:end]).long(),
        }

    @property
    def loss_tokens(self) -> np.ndarray:
        """(N,) number of positions with a target in each sample."""
        return np.maximum(self.lengths - np.maximum(self.prompt_len, 1), 0)

    def __repr__(self) -> str:
        return f"TokenizedDataset({self.name!r}, samples={len(self)})"
