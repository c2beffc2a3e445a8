"""A preallocated key/value cache for incremental decoding."""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Keys and values of every position seen so far, in fixed buffers.

    The buffers are preallocated once (static shapes: decode steps can be compiled and never
    reallocate) and are not persistent, so they never end up in a state dict.

    Args:
        batch_size: Number of sequences decoded together.
        n_kv_heads: Key/value heads per layer.
        max_seq_len: Number of positions the cache holds (prompt + new tokens).
        head_dim: Size of one head.
        dtype: Element type of the buffers.
        device: Where the buffers live.
    """

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.max_seq_len = max_seq_len
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)  # (B, KV, S, D)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, cache_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, KV, T, D) at slots cache_pos (T,) and return the whole cache."""
        if k.shape[0] != self.k.shape[0]:
            raise ValueError(
                f"batch of {k.shape[0]} does not match the KV cache batch size {self.k.shape[0]}"
            )
        self.k.index_copy_(2, cache_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, cache_pos, v.to(self.v.dtype))
        return self.k, self.v  # (B, KV, S, D)
