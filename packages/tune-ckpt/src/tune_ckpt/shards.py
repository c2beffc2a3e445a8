"""Meta model-parallel shards (consolidated.00.pth ... .NN.pth) seen as one checkpoint.

Meta's Llama 2 13B ships as 2 shards, Llama 2 70B and Llama 3.1 70B as 8, cut by fairscale's
model-parallel layers. Merging happens tensor by tensor, when the converter asks for one, so
the shards are never all in memory.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tune_ckpt.errors import CheckpointError
from tune_ckpt.keymaps import IGNORED_KEYS
from tune_ckpt.names import META_SHARD_PATTERN
from tune_ckpt.plan import DictSource, FileRange, TensorSource
from tune_ckpt.reading import open_tensor_files

# How Meta's model-parallel layers split each weight across shards (fairscale): column-parallel
# weights (wq, wk, wv, w1, w3, output) are split along the output rows, row-parallel ones (wo,
# w2) along the input columns; norms are replicated. The embedding is Llama 2's
# ParallelEmbedding (split along the columns) or Llama 3's VocabParallelEmbedding (split along
# the vocabulary, the rows).
_ROWS = re.compile(r"attention\.w[qkv]\.weight$|feed_forward\.w[13]\.weight$|^output\.weight$")
_COLS = re.compile(r"attention\.wo\.weight$|feed_forward\.w2\.weight$")
_EMBEDDING = "tok_embeddings.weight"
_SHARD = re.compile(META_SHARD_PATTERN)


def meta_shard_dim(key: str, embedding_dim: int = 1) -> int | None:
    """The dimension Meta splits ``key`` along across model-parallel shards (None: replicated).

    Args:
        key: A Meta tensor name.
        embedding_dim: Where the embedding is split: 1 (Llama 2), 0 (Llama 3).
    """
    if _ROWS.search(key):
        return 0
    if _COLS.search(key):
        return 1
    if key == _EMBEDDING:
        return embedding_dim
    return None


class MetaShardSource(TensorSource):
    """Meta model-parallel shards seen as one merged checkpoint; merging happens per tensor.

    Args:
        shards: The shards, in order.
        vocab_size: The vocabulary size, when params.json gives it: an embedding shard
            with 1/n of those rows is split along the vocabulary (Llama 3), else along the
            columns (Llama 2, whose params.json says -1).
    """

    def __init__(self, shards: list[TensorSource], vocab_size: int | None = None):
        self._shards = shards
        self._embedding_dim = 1
        if len(shards) > 1 and vocab_size and _EMBEDDING in shards[0].keys():
            rows = shards[0].shape(_EMBEDDING)[0]
            if rows != vocab_size and rows * len(shards) == vocab_size:
                self._embedding_dim = 0
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

    @property
    def n_shards(self) -> int:
        return len(self._shards)

    def _dim(self, key: str) -> int | None:
        return meta_shard_dim(key, self._embedding_dim)

    def shape(self, key: str) -> tuple[int, ...]:
        shape = list(self._shards[0].shape(key))
        dim = self._dim(key)
        if dim is not None and dim < len(shape):
            shape[dim] *= len(self._shards)
        return tuple(shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._shards[0].dtype(key)

    def get(self, key: str) -> torch.Tensor:
        parts = [shard.get(key) for shard in self._shards]
        dim = self._dim(key)
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
        dim = self._dim(key)
        if len(self._shards) == 1 or dim is None:
            return self._shards[0].file_ranges(key)
        if dim != 0:
            return None  # a column split interleaves the shards' bytes
        parts = [shard.file_ranges(key) for shard in self._shards]
        return None if any(p is None for p in parts) else [r for p in parts for r in p]


def merge_meta_shards(
    shards: list[dict[str, torch.Tensor]], vocab_size: int | None = None
) -> dict[str, torch.Tensor]:
    """Merge Meta model-parallel shards (consolidated.00.pth, .01, ...) into one state dict.

    wq, wk, wv, w1, w3 and output concatenate on dim 0; wo and w2 on dim 1; tok_embeddings
    on dim 1 (Llama 2), or dim 0 when ``vocab_size`` says the shards split the vocabulary
    (Llama 3); norms are replicated; ``rope.freqs`` is dropped.

    Args:
        shards: The shards' state dicts, in shard order.
        vocab_size: params.json's vocab_size, if it gives one.

    Returns:
        The merged Meta state dict.

    Raises:
        CheckpointError: If the shards do not hold the same keys and shapes.
    """
    if not shards:
        raise CheckpointError("no model-parallel shards to merge")
    source = MetaShardSource([DictSource(s, {k: f"shard {i}" for k in s})
                              for i, s in enumerate(shards)], vocab_size)
    return {k: source.get(k) for k in source.keys()}


def meta_shard_files(path: Path) -> list[Path]:
    """Every model-parallel shard of a Meta checkpoint, in order.

    Args:
        path: Its folder, one of its ``consolidated.NN.pth`` (which brings all of them), or a
            lone Meta-layout file under another name.

    Raises:
        CheckpointError: If a shard is missing or there is none.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_file() and not _SHARD.match(path.name):
        return [path]
    numbered = sorted((int(m.group(1)), p) for p in folder.iterdir()
                      if (m := _SHARD.match(p.name)))
    files = [p for _, p in numbered]
    if not files:
        raise CheckpointError(f"no consolidated.NN.pth in {folder}: not a Meta checkpoint")
    for expected, (number, _) in enumerate(numbered):
        if number != expected:
            raise CheckpointError(
                f"model-parallel shard consolidated.{expected:02d}.pth is missing from "
                f"{folder} (found {', '.join(p.name for p in files)}); download it again"
            )
    return files


def open_meta_shards(files: list[Path], vocab_size: int | None = None) -> MetaShardSource:
    """The shards' tensors, mapped lazily, as one merged checkpoint."""
    return MetaShardSource([open_tensor_files([f]) for f in files], vocab_size)


def tied_embeddings(source: TensorSource, embedding: str, output: str) -> bool:
    """Whether a checkpoint's output matrix is its embedding (or it stores none).

    Meta's Llama 3.2 files hold ``output.weight`` as a copy of the embedding, which
    transformers ties; Llama 2 and 3.1 have their own. Compared a row block at a time, from
    the mapped files (the first row settles an untied model), so it costs no memory. Only a
    single file is compared: Meta's tied models ship unsharded.
    """
    keys = set(source.keys())
    if output not in keys:
        return embedding in keys
    if (embedding not in keys or source.shape(embedding) != source.shape(output)
            or getattr(source, "n_shards", 1) != 1):
        return False
    a, b = source.get(embedding), source.get(output)
    try:
        if not torch.equal(a[:1], b[:1]):
            return False
        step = max(1, (64 << 20) // max(1, a[0].numel() * a.element_size()))  # 64 MB at a time
        return all(torch.equal(a[i : i + step], b[i : i + step])
                   for i in range(0, a.shape[0], step))
    finally:
        source.release(embedding, output)
