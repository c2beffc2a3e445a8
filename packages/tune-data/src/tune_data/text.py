"""Plain-text datasets for continued pre-training: documents cut into max_seq_len chunks."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tune_data.dataset import TokenizedArrays, TokenizedDataset
from tune_data.instruct import _describe_source, _tokenize_records
from tune_data.ragged import flatten
from tune_data.sources import DataFiles, check_columns, check_source, load_records
from tune_data.tokenizers import Tokenizer

_FORMAT_VERSION = "text-2"  # 2: a per-token loss mask


class _Chunker:
    def __init__(self, tokenizer: Tokenizer, column: str, max_seq_len: int | None):
        self.tokenizer = tokenizer
        self.column = column
        self.max_seq_len = max_seq_len

    def __call__(self, batch: Mapping[str, list[Any]], indices: list[int]):
        texts = [t if isinstance(t, str) else str(t) for t in batch[self.column]]
        keep = [i for i, t in enumerate(texts) if t.strip()]  # empty documents teach nothing
        encoded = self._encode([texts[i] for i in keep])
        chunks, rows = [], []
        for i, ids in zip(keep, encoded):
            step = self.max_seq_len or len(ids)
            for start in range(0, len(ids), step):
                chunk = ids[start : start + step]
                if len(chunk) < 2:
                    continue  # a lone token has no next token to learn
                chunks.append(chunk)
                rows.append(indices[i])
        tokens, offsets = flatten(chunks)
        n = len(chunks)
        return TokenizedArrays(
            tokens, offsets, np.ones(len(tokens), dtype=bool), np.array(rows, dtype=np.int64),
            np.zeros(n, dtype=bool),
        ).to_arrow()

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """BOS + ids + EOS of each text; long texts are cut into blocks encoded in one batch.

        A tokenizer's batch call gives each text to one thread (or, for tiktoken here, runs
        them in turn), so a single book would be one long call on one core. Cut where
        :attr:`Tokenizer.cuts_after_newline` allows, the blocks' ids joined equal the whole
        text's ids.
        """
        tok = self.tokenizer
        if not tok.cuts_after_newline:
            return tok.encode_batch(texts, add_bos=True, add_eos=True)
        heads, tails, owners = [], [], []
        for n, text in enumerate(texts):
            blocks = _blocks_at_newlines(text, _BLOCK_CHARS)
            heads.append(blocks[0])
            tails += blocks[1:]
            owners += [n] * (len(blocks) - 1)
        out = tok.encode_batch(heads, add_bos=True, add_eos=False)
        ids, offsets = tok.encode_after_newline(tails)
        bounds = offsets.tolist()
        for n, a, b in zip(owners, bounds, bounds[1:]):
            out[n] += ids[a:b].tolist()
        for row in out:
            row.append(tok.eos_id)
        return out


_BLOCK_CHARS = 1 << 16
_CUT = re.compile(r"\n(?=\S)")  # a newline followed by a character that is not whitespace


def _blocks_at_newlines(text: str, size: int) -> list[str]:
    """Text cut into pieces of about ``size`` characters, each cut just after a newline
    whose next character is not whitespace."""
    blocks, start = [], 0
    while len(text) - start > size:
        found = _CUT.search(text, start + size)
        if found is None:
            break
        blocks.append(text[start : found.end()])
        start = found.end()
    blocks.append(text[start:])
    return blocks


def text_completion_dataset(
    tokenizer: Tokenizer,
    source: str | None = None,
    *,
    data_files: DataFiles | None = None,
    column: str = "text",
    split: str = "train",
    max_seq_len: int | None = 512,
    cache_dir: str | Path | None = None,
    **load_kwargs: Any,
) -> TokenizedDataset:
    """Documents as ``BOS + text + EOS``, cut into chunks of ``max_seq_len`` tokens.

    Every token is a target (no prompt mask); each chunk is a sample, so a long document such
    as tinyshakespeare becomes ``ceil(tokens / max_seq_len)`` samples. A local ``.txt`` file is
    one document (``sample_by="paragraph"`` or ``"line"`` splits it; see ``datasets``' text
    builder). Empty documents are dropped.

    Args:
        tokenizer: The model's tokenizer.
        source: Hub dataset name, local file, or builder name (None: from data_files).
        data_files: Local txt / json / jsonl / csv / parquet file(s).
        column: The column holding the text.
        split: Split to load.
        max_seq_len: Chunk length in tokens (None: one sample per document).
        cache_dir: ``datasets`` cache folder.
        **load_kwargs: Passed on to ``datasets.load_dataset``.

    Returns:
        The dataset; ``dataset[i]`` is ``{"tokens", "labels"}``.

    Raises:
        DataError: If the data cannot be loaded or lacks the column.
    """
    source = check_source("a text dataset", source, data_files, max_seq_len)
    records = load_records(source, data_files, split, cache_dir, **load_kwargs)
    where = _describe_source(source, data_files)
    check_columns(records, [column], where, hint="pass column='your_text_column'")
    records = records.select_columns([column])
    return _tokenize_records(
        records, _Chunker(tokenizer, column, max_seq_len),
        (_FORMAT_VERSION, tokenizer.fingerprint, column, max_seq_len), tokenizer, max_seq_len,
        where, short_name=data_files is not None,
        batch_size=64,  # documents can be whole books
    )
