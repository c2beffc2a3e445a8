"""A tokenized dataset held as flat arrays: fast indexing, lengths for free."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tune_data.tokenizers import Tokenizer

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

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


def prefix_mask(offsets: np.ndarray, prompt_len: np.ndarray) -> np.ndarray:
    """The ``trained`` mask of samples whose first ``prompt_len`` tokens take no loss.

    Args:
        offsets: (N + 1,) start of each sample in the flat token array.
        prompt_len: (N,) masked prefix length of each sample (0: every token is a target).

    Returns:
        Flat bool, one per token: True where the token is a target.
    """
    lengths = np.diff(offsets)
    # Position j of the flat array is a target from its sample's first target on.
    within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    return within >= np.repeat(np.asarray(prompt_len, dtype=np.int64), lengths)


def _all_labels(tokens: np.ndarray, offsets: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """Shifted labels of every sample at once, flat int32 like the tokens.

    Made once (milliseconds for millions of tokens) so that fetching a sample is two slices.
    """
    labels = np.full(len(tokens), IGNORE_INDEX, dtype=np.int32)
    np.copyto(labels[:-1], tokens[1:], where=trained[1:])  # position j predicts token j + 1
    # A sample's last position predicts nothing (the next token starts another sample); this
    # is also why a sample's first token never needs to be marked untrained.
    lengths = np.diff(offsets)
    labels[offsets[1:][lengths > 0] - 1] = IGNORE_INDEX
    return labels


@dataclass
class Turns:
    """Where each message of a conversation starts, for chat datasets (ragged per sample).

    Args:
        starts: Flat int32: the token position (within its sample) where each message starts.
        roles: Flat int8, one per message: an index into :data:`ROLES`.
        offsets: (N + 1,) int64: sample i's messages are ``starts[offsets[i]:offsets[i + 1]]``.
    """

    starts: np.ndarray
    roles: np.ndarray
    offsets: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        """(N,) messages in each sample (system messages included)."""
        return np.diff(self.offsets)

    def of(self, index: int) -> list[tuple[int, str]]:
        """(token position, role) of each message of sample ``index``."""
        a, b = int(self.offsets[index]), int(self.offsets[index + 1])
        return [(int(s), ROLES[int(r)]) for s, r in zip(self.starts[a:b], self.roles[a:b])]


# Message roles as Turns stores them.
ROLES = ("system", "user", "assistant")


@dataclass
class TokenizedArrays:
    """The columns a dataset is made of, as tokenisers produce them and caches store them.

    Args:
        tokens: Flat int32 token ids of all samples.
        offsets: (N + 1,) int64 start of each sample in ``tokens``.
        trained: Flat bool, one per token: True where the token is a target (takes loss,
            predicted from the position before it). A sample's first token is never one.
        rows: (N,) the source record each sample came from.
        truncated: (N,) whether the sample was cut to ``max_seq_len``.
        turns: Where each message starts (chat datasets), else None.
    """

    tokens: np.ndarray
    offsets: np.ndarray
    trained: np.ndarray
    rows: np.ndarray
    truncated: np.ndarray
    turns: Turns | None = None

    @classmethod
    def concatenate(cls, parts: list[TokenizedArrays]) -> TokenizedArrays:
        """Batches joined in order."""
        if len(parts) == 1:
            return parts[0]
        turns = None
        if all(p.turns is not None for p in parts):
            turns = Turns(
                np.concatenate([p.turns.starts for p in parts]),
                np.concatenate([p.turns.roles for p in parts]),
                _join_offsets([p.turns.offsets for p in parts]),
            )
        return cls(
            np.concatenate([p.tokens for p in parts]),
            _join_offsets([p.offsets for p in parts]),
            np.concatenate([p.trained for p in parts]),
            np.concatenate([p.rows for p in parts]),
            np.concatenate([p.truncated for p in parts]),
            turns,
        )

    @classmethod
    def from_arrow(cls, table: pa.Table) -> TokenizedArrays:
        """From the columns ``tokens``, ``trained``, ``row``, ``truncated`` (and
        ``turn_starts``, ``turn_roles``) of a table."""
        tokens, offsets = _list_column(table, "tokens", np.int32)
        trained, _ = _list_column(table, "trained", np.bool_)
        turns = None
        if "turn_starts" in table.column_names:
            starts, turn_offsets = _list_column(table, "turn_starts", np.int32)
            roles, _ = _list_column(table, "turn_roles", np.int8)
            turns = Turns(starts, roles, turn_offsets)
        return cls(
            tokens, offsets, trained,
            _to_numpy(table.column("row").combine_chunks(), np.int64).copy(),
            _to_numpy(table.column("truncated").combine_chunks(), np.bool_),
            turns,
        )

    def to_arrow(self) -> pa.Table:
        """The columns as ``datasets`` stores them (its map cache and ours share the layout)."""
        import pyarrow as pa

        offsets = _to_arrow(self.offsets.astype(np.int32))
        columns = {
            "tokens": pa.ListArray.from_arrays(offsets, _to_arrow(self.tokens.astype(np.int32))),
            "trained": pa.ListArray.from_arrays(offsets, _to_arrow(self.trained.astype(np.bool_))),
            "row": _to_arrow(self.rows.astype(np.int64)),
            "truncated": _to_arrow(self.truncated.astype(np.bool_)),
        }
        if self.turns is not None:
            turn_offsets = _to_arrow(self.turns.offsets.astype(np.int32))
            columns["turn_starts"] = pa.ListArray.from_arrays(
                turn_offsets, _to_arrow(self.turns.starts.astype(np.int32)))
            columns["turn_roles"] = pa.ListArray.from_arrays(
                turn_offsets, _to_arrow(self.turns.roles.astype(np.int8)))
        return pa.table(columns)


def _join_offsets(parts: list[np.ndarray]) -> np.ndarray:
    """(N + 1,) offsets of ragged arrays joined in order."""
    starts = np.cumsum([0] + [int(p[-1]) for p in parts[:-1]])
    total = sum(int(p[-1]) for p in parts)
    return np.concatenate([*(p[:-1] + s for p, s in zip(parts, starts)), [total]]).astype(
        np.int64)


def _list_column(table: pa.Table, name: str, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (flat values, (N + 1,) int64 offsets), rebased to this slice."""
    column = table.column(name).combine_chunks()
    offsets = _to_numpy(column.offsets, np.int32).astype(np.int64)
    values = _to_numpy(column.values, dtype)
    # A sliced list array shares its parent's buffers: rebase to this slice.
    values, offsets = values[offsets[0] : offsets[-1]], offsets - offsets[0]
    return values.copy(), offsets  # a writable copy, off Arrow's buffer


# numpy <-> Arrow through raw buffers: pyarrow's own conversions import pandas (~0.3 s), which
# a training process that never touches datasets would load just to read a cache.
_ARROW_TYPES = {
    np.dtype(np.int8): "int8", np.dtype(np.int32): "int32", np.dtype(np.int64): "int64",
    np.dtype(np.bool_): "bool",
}


def _to_arrow(values: np.ndarray) -> pa.Array:
    import pyarrow as pa

    arrow_type = pa.type_for_alias(_ARROW_TYPES[values.dtype])
    if values.dtype == np.bool_:  # Arrow packs booleans into bits, least significant first
        data = np.packbits(values, bitorder="little")
    else:
        data = np.ascontiguousarray(values)
    return pa.Array.from_buffers(arrow_type, len(values), [None, pa.py_buffer(data)])


def _to_numpy(array: pa.Array, dtype: type) -> np.ndarray:
    """A null-free primitive Arrow array as numpy (a view, except for booleans)."""
    expected = _ARROW_TYPES[np.dtype(dtype)]
    if array.null_count or str(array.type) != expected:
        raise ValueError(f"expected {expected} without nulls, got {array.type}")
    data = array.buffers()[1]
    if np.dtype(dtype) == np.bool_:
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
        return bits[array.offset : array.offset + len(array)].astype(np.bool_)
    itemsize = np.dtype(dtype).itemsize
    return np.frombuffer(data, dtype=dtype, count=len(array), offset=array.offset * itemsize)


class TokenizedDataset(Dataset):
    """Samples of token ids with a loss mask, ready for :func:`tune_data.collate`.

    ``dataset[i]`` is ``{"tokens": (L,) int64, "labels": (L,) int64}`` with labels already
    shifted (``labels[j]`` is the target for ``tokens[j]``, -100 where no loss is taken).
    All token ids live in one flat int32 array with offsets, so indexing costs a slice and
    :attr:`lengths` (for length grouping and packing) costs nothing. Which tokens are
    targets is one flat mask (``trained``): a masked prompt prefix (instruction data),
    every assistant turn of a conversation (chat data), or every token (text).

    Args:
        tokens: Flat int32 token ids of all samples.
        offsets: (N + 1,) start of each sample in ``tokens``.
        trained: Flat bool, one per token: True where the token is a target (see
            :func:`prefix_mask` for a masked prefix per sample).
        rows: (N,) the source record each sample came from.
        truncated: (N,) whether the sample was cut to ``max_seq_len``.
        turns: Where each message of a conversation starts (chat datasets), else None.
        tokenizer: The tokenizer that made it (to decode samples).
        name: What the data is, for reports (a file or hub name).
        source_rows: Records in the source (to count dropped ones).
        max_seq_len: The length samples were cut to (None: not cut).
        hf_dataset: The cached ``datasets.Dataset`` the arrays were read from, if any.
        cache_file: The Arrow file the arrays are cached in, if any; ``hf_dataset`` opens it
            when first asked for.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        offsets: np.ndarray,
        trained: np.ndarray,
        rows: np.ndarray,
        truncated: np.ndarray,
        *,
        turns: Turns | None = None,
        tokenizer: Tokenizer | None = None,
        name: str = "",
        source_rows: int | None = None,
        max_seq_len: int | None = None,
        hf_dataset: datasets.Dataset | None = None,
        cache_file: str | Path | None = None,
    ):
        self._tokens = tokens
        self._offsets = offsets
        self.rows = rows
        self.truncated = truncated
        self.turns = turns
        self.lengths = np.diff(offsets)
        self.tokenizer = tokenizer
        self.name = name
        self.source_rows = len(rows) if source_rows is None else source_rows
        self.max_seq_len = max_seq_len
        self._hf_dataset = hf_dataset
        self.cache_file = None if cache_file is None else Path(cache_file)
        self._labels = _all_labels(tokens, offsets, trained)
        self._bounds = offsets.tolist()  # Python ints index numpy arrays fastest

    @classmethod
    def from_arrays(cls, arrays: TokenizedArrays, **kwargs: Any) -> TokenizedDataset:
        """From a tokeniser's or a cache's columns; keywords as for the constructor."""
        return cls(
            arrays.tokens, arrays.offsets, arrays.trained, arrays.rows, arrays.truncated,
            turns=arrays.turns, **kwargs,
        )

    @classmethod
    def from_hf(cls, ds: datasets.Dataset, **kwargs: Any) -> TokenizedDataset:
        """From the columns of :meth:`TokenizedArrays.to_arrow` in a ``datasets.Dataset``."""
        table = ds.with_format("arrow")[:]  # honours any indices mapping; no copy otherwise
        return cls.from_arrays(TokenizedArrays.from_arrow(table), hf_dataset=ds, **kwargs)

    @property
    def hf_dataset(self) -> datasets.Dataset | None:
        """The arrays as a ``datasets.Dataset`` (memory-mapped from the cache file), if cached."""
        if self._hf_dataset is None and self.cache_file is not None:
            import datasets

            self._hf_dataset = datasets.Dataset.from_file(str(self.cache_file))
        return self._hf_dataset

    def __len__(self) -> int:
        return len(self.lengths)

    def token_ids(self, index: int) -> np.ndarray:
        """(L,) int32 token ids of one sample."""
        return self._tokens[self._offsets[index] : self._offsets[index + 1]]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range (dataset has {len(self)})")
        if index < 0:
            index += len(self)
        start, end = self._bounds[index], self._bounds[index + 1]
        return {  # int32 -> int64 copies: a caller may change a sample without harm
            "tokens": torch.from_numpy(self._tokens[start:end].astype(np.int64)),
            "labels": torch.from_numpy(self._labels[start:end].astype(np.int64)),
        }

    @property
    def loss_tokens(self) -> np.ndarray:
        """(N,) number of positions with a target in each sample."""
        counts = np.zeros(len(self._labels) + 1, dtype=np.int64)
        np.cumsum(self._labels != IGNORE_INDEX, out=counts[1:])
        return counts[self._offsets[1:]] - counts[self._offsets[:-1]]

    def __repr__(self) -> str:
        return f"TokenizedDataset({self.name!r}, samples={len(self)})"
