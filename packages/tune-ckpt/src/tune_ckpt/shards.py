"""Meta model-parallel shards (consolidated.00.pth ... .NN.pth) seen as one checkpoint.

Meta's 13B ships as 2 shards and 70B as 8, cut by fairscale's model-parallel layers.
Merging happens tensor by tensor, when the converter asks for one, so the shards are never
all in memory.
"""

from __future__ import annotations

import re

import torch

from tune_ckpt.errors import CheckpointError
from tune_ckpt.keymaps import IGNORED_KEYS
from tune_ckpt.plan import DictSource, FileRange, TensorSource

# How Meta's model-parallel layers split each weight across shards (fairscale): column-parallel
# weights (wq, wk, wv, w1, w3, output) are split along the output rows, row-parallel ones (wo,
# w2) and the parallel embedding along the input columns; norms are replicated.
_ROWS = re.compile(r"attention\.w[qkv]\.weight$|feed_forward\.w[13]\.weight$|^output\.weight$")
_COLS = re.compile(r"attention\.wo\.weight$|feed_forward\.w2\.weight$|^tok_embeddings\.weight$")


def meta_shard_dim(key: str) -> int | None:
    """The dimension Meta splits ``key`` along across model-parallel shards (None: replicated)."""
    if _ROWS.search(key):
        return 0
    if _COLS.search(key):
        return 1
    return None


class MetaShardSource(TensorSource):
    """Meta model-parallel shards seen as one merged checkpoint; merging happens per tensor."""

    def __init__(self, shards: list[TensorSource]):
        self._shards = shards
        keys = [k for k in shards[0].keys() if not IGNORED_KEYS.match(k)]
        for shard in shards[1:]:
            other = [k for k in shard.keys() if not IGNORED_KEYS.match(k)]
            if set(other) != set(keys):
                diff = sorted(set(keys) ^ set(other))[0]
                holder = shard if diff in other else shards[0]
                raise CheckpointError(
                    f"model-parallel shards differ: '{diff}' is in {holder.where(diff)} but not in "
                    f"{(shards[0] if holder is shard else shard).where(keys[0])}"
                )
            for k in keys:
                if shard.shape(k) != shards[0].shape(k):
                    raise CheckpointError(
                        f"{shard.where(k)}: '{k}' has shape {shard.shape(k)} but "
                        f"{shards[0].shape(k)} in {shards[0].where(k)}; shards must match"
                    )
        self._keys = keys

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        shape = list(self._shards[0].shape(key))
        dim = meta_shard_dim(key)
        if dim is not None and dim < len(shape):
            shape[dim] *= len(self._shards)
        return tuple(shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._shards[0].dtype(key)

    def get(self, key: str) -> torch.Tensor:
        parts = [shard.get(key) for shard in self._shards]
        dim = meta_shard_dim(key)
        if len(parts) == 1 or dim is None:
            return parts[0]
        return torch.cat(parts, dim=dim)

    def where(self, key: str) -> str:
        if len(self._shards) == 1:
            return self._shards[0].where(key)
        return f"{self._shards[0].where(key)} (+{len(self._shards) - 1} model-parallel shards)"

    def release(self, *keys: str) -> None:
        for shard in self._shards:
            shard.release(*keys)

    def file_ranges(self, key: str) -> list[FileRange] | None:
        dim = meta_shard_dim(key)
        if len(self._shards) == 1 or dim is None:
            return self._shards[0].file_ranges(key)
        if dim != 0:
            return None  # a column split interleaves the shards' bytes
        parts = [shard.file_ranges(key) for shard in self._shards]
        return None if any(p is None for p in parts) else [r for p in parts for r in p]


def merge_meta_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Merge Meta model-parallel shards (consolidated.00.pth, .01, ...) into one state dict.

    wq, wk, wv, w1, w3 and output concatenate on dim 0; wo, w2 and tok_embeddings on dim 1;
    norms are replicated; ``rope.freqs`` is dropped.

    Args:
        shards: The shards' state dicts, in shard order.

    Returns:
        The merged Meta state dict.

    Raises:
        CheckpointError: If the shards do not hold the same keys and shapes.
    """
    if not shards:
        raise CheckpointError("no model-parallel shards to merge")
    source = MetaShardSource([DictSource(s, {k: f"shard {i}" for k in s})
                              for i, s in enumerate(shards)])
    return {k: source.get(k) for k in source.keys()}
