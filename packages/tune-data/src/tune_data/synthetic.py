"""Random token sequences: throughput and memory checks that need no data files.

The GPU benchmark trains a 7B-shaped model on these, on machines that have torch and
sentencepiece but not ``datasets``; nothing here imports it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tune_data.dataset import TokenizedDataset


def random_tokens_dataset(
    tokenizer: Any,
    max_seq_len: int | None = 2048,
    *,
    num_samples: int = 64,
    seed: int = 0,
) -> TokenizedDataset:
    """``num_samples`` sequences of exactly ``max_seq_len`` uniform random tokens (never zeros:
    they would make softmax and matmul work unrepresentative), every position a target.

    It reads no data, so it takes none of the data arguments (source, data_files, ...); a
    config that sets them is told they are ignored.
    """
    length = max_seq_len or 2048
    rng = np.random.default_rng(seed)
    vocab = tokenizer.vocab_size if tokenizer is not None else 32000
    tokens = rng.integers(3, vocab, size=num_samples * length, dtype=np.int32)
    offsets = np.arange(0, num_samples * length + 1, length, dtype=np.int64)
    return TokenizedDataset(
        tokens, offsets, trained=np.ones(len(tokens), dtype=bool),
        rows=np.arange(num_samples), truncated=np.zeros(num_samples, dtype=bool),
        tokenizer=tokenizer, name="random tokens", max_seq_len=length,
    )
