"""Llama 2 in one file: config, modules and presets (torch only).

The parameter names below are the *native key schema* that tune-ckpt converts to and from; see
the package README for the full table. Two choices define it:

* Attention has ONE fused projection ``wqkv`` whose output rows are laid out
  ``[Q heads | K heads | V heads]`` (n_heads*head_dim, then n_kv_heads*head_dim twice). One
  matmul instead of three is faster at every size, and the split is a free view.
* Rotary embeddings use Meta's convention: dimension pairs ``(2i, 2i+1)`` of each head are
  rotated together, so Meta's ``wq``/``wk`` rows are taken as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tune_models.kv_cache import KVCache
from tune_models.loss import linear_cross_entropy


@dataclass
class Llama2Config:
    """Shape of a Llama-2-class model.

    Args:
        vocab_size: Number of token ids.
        dim: Width of the residual stream.
        n_layers: Number of transformer blocks.
        n_heads: Number of query heads.
        n_kv_heads: Number of key/value heads (grouped-query attention); None means n_heads.
        multiple_of: The feed-forward width is rounded up to a multiple of this (Meta's rule).
        ffn_dim_multiplier: Optional scale on the feed-forward width before rounding (70B: 1.3).
        hidden_dim: Feed-forward width; None derives it from dim with Meta's rule.
        norm_eps: Epsilon of RMSNorm.
        max_seq_len: Longest sequence the model accepts.
        rope_theta: Base of the rotary embedding frequencies.

    Raises:
        ValueError: When the sizes do not fit together.
    """

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None
    norm_eps: float = 1e-5
    max_seq_len: int = 4096
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(
                f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
            )
        if (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"head_dim = dim / n_heads = {self.dim // self.n_heads} must be even for RoPE"
            )
        if self.hidden_dim is None:
            # Meta's rule: 2/3 of 4*dim (SwiGLU has three matrices), optionally scaled, then
            # rounded up to multiple_of. 7B: 4096 -> 11008.
            hidden = int(2 * 4 * self.dim / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def llama2_7b() -> Llama2Config:
    """Llama-2-7B: 6,738,415,616 parameters."""
    return Llama2Config(dim=4096, n_layers=32, n_heads=32)


def llama2_13b() -> Llama2Config:
    """Llama-2-13B: 13,015,864,320 parameters."""
    return Llama2Config(dim=5120, n_layers=40, n_heads=40)


def llama2_70b() -> Llama2Config:
    """Llama-2-70B (grouped-query attention, 8 KV heads): 68,976,648,192 parameters."""
    return Llama2Config(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096
    )


def llama2_tiny(vocab_size: int = 32000) -> Llama2Config:
    """A ~1M-parameter (plus embeddings) Llama 2 for tests and demos; grouped-query like 70B."""
    return Llama2Config(
        vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
        max_seq_len=512,
    )


def llama2_20m(vocab_size: int = 32000) -> Llama2Config:
    """A ~20M-parameter Llama 2 (most of it embeddings at vocab 32000), the CPU benchmark size."""
    return Llama2Config(
        vocab_size=vocab_size, dim=256, n_layers=4, n_heads=8, multiple_of=64, max_seq_len=1024
    )


def rope_cache(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Cosines and sines of the rotary angles at the given positions.

    Computed per forward from positions rather than kept as a buffer: it costs T*head_dim/2
    trig ops (nothing next to the matmuls), survives building on the meta device, and packed
    batches (per-sample positions) and decoding (offset positions) need no special case.

    Args:
        positions: Integer positions, any shape P.
        head_dim: Size of one attention head (even).
        theta: Frequency base.

    Returns:
        float32 tensor of shape (*P, head_dim // 2, 2) holding (cos, sin).
    """
    freqs = theta ** -(
        torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    angles = positions.to(torch.float32).unsqueeze(-1) * freqs  # (*P, D/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)  # (*P, D/2, 2)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (2i, 2i+1) of every head of x by the angles in rope (Meta's layout).

    Args:
        x: (B, T, H, D) queries or keys.
        rope: (T, D/2, 2) or (B, T, D/2, 2) from :func:`rope_cache`.

    Returns:
        Tensor shaped and typed like x.
    """
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, H, D/2) each
    cos, sin = rope.unsqueeze(-3).unbind(-1)  # (B?, T, 1, D/2) each: broadcast over heads
    # Compute in fp32 like Meta's reference: bf16 angles lose position resolution at 4k.
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(-2).type_as(x)  # (B, T, H, D)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the gain, as the reference does.
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    """Grouped-query self-attention with a fused QKV projection and rotary embeddings."""

    def __init__(self, config: Llama2Config):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        qkv_out = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
        self.wqkv = nn.Linear(config.dim, qkv_out, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        h, kv = self.n_heads, self.n_kv_heads
        qkv = self.wqkv(x).view(b, t, h + 2 * kv, self.head_dim)  # (B, T, H+2KV, D)
        # Queries and keys are rotated together: one set of kernels instead of two.
        qk = apply_rope(qkv[:, :, : h + kv], rope)  # (B, T, H+KV, D)
        q, k = qk.split([h, kv], dim=2)  # (B, T, H, D), (B, T, KV, D)
        v = qkv[:, :, h + kv :]  # (B, T, KV, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|KV, T, D)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(cache_pos, k, v)  # (B, KV, S, D)
        if self.n_kv_heads != self.n_heads:
            # Every group of n_heads/n_kv_heads query heads shares one K/V head. Expanding
            # here keeps every SDPA backend (flash included) available on every torch version.
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)  # (B, H, S, D)
            v = v.repeat_interleave(rep, dim=1)  # (B, H, S, D)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))
        y = y.transpose(1, 2).reshape(b, t, h * self.head_dim)  # (B, T, H*D)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm attention and feed-forward, each with a residual connection.

    ``use_checkpoint`` is the activation-checkpointing hook point: tune-train sets it, and the
    model then recomputes this block's activations in backward instead of storing them. The
    parameter names do not change, so checkpoints and FSDP wrapping are unaffected.
    """

    def __init__(self, config: Llama2Config):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim)
        self.use_checkpoint = False

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, cache_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama2(nn.Module):
    """The Llama 2 decoder.

    Args:
        config: Model shape.
    """

    def __init__(self, config: Llama2Config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)

    def init_weights(self, std: float = 0.02) -> None:
        """Random initialisation for training from scratch (pretrained weights skip this).

        Normal(0, std) everywhere, with the projections that write into the residual stream
        (wo, w2) scaled by 1/sqrt(2 * n_layers) so its variance does not grow with depth.
        """
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(param, 0.0, out_std)
            else:
                nn.init.normal_(param, 0.0, std)

    def setup_caches(
        self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None
    ) -> None:
        """Preallocate a KV cache of max_seq_len positions in every attention layer.

        Size it to what the caller needs (prompt + new tokens), not the model's max_seq_len:
        every decode step attends over the whole cache.
        """
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(
                f"KV cache length {max_seq_len} exceeds max_seq_len {self.config.max_seq_len}"
            )
        weight = self.output.weight
        dtype = dtype or weight.dtype
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(
                batch_size, self.config.n_kv_heads, max_seq_len, self.config.head_dim,
                dtype=dtype, device=weight.device,
            )

    def clear_caches(self) -> None:
        """Drop the KV caches (back to plain full-sequence forwards)."""
        for layer in self.layers:
            layer.attention.kv_cache = None

    @property
    def caches_are_enabled(self) -> bool:
        return self.layers[0].attention.kv_cache is not None

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the model.

        Args:
            tokens: (B, T) token ids.
            input_pos: Positions of the tokens, (T,) or (B, T); default 0..T-1. With a KV
                cache it is required, must be (T,), and names the cache slots written.
                Packed batches pass per-sample positions (B, T).
            mask: Optional boolean attention mask, (B, T, S) or (T, S), True = may attend.
                Default: causal. With a KV cache the default is causal over cache slots.
            labels: Optional (B, T) next-token targets with -100 where no loss is taken. When
                given, the summed cross-entropy is returned instead of logits, computed in
                chunks so the fp32 logits of the whole batch never exist.

        Returns:
            (B, T, vocab_size) logits, or the fp32 scalar sum of token losses if labels given.

        Raises:
            ValueError: If the sequence is longer than max_seq_len or arguments do not fit.
        """
        h = self.hidden_states(tokens, input_pos, mask)
        if labels is not None:
            return linear_cross_entropy(h, self.output.weight, labels)
        return self.output(h)

    def hidden_states(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final, normalised hidden states: ``forward`` without the output projection.

        For callers that need logits at a few positions only (the last prompt position when
        decoding, the continuation tokens when scoring): ``model.output(h[:, -1])`` costs one
        row of the (dim x vocab_size) projection instead of T.

        Args:
            tokens: (B, T) token ids.
            input_pos: As in ``forward``.
            mask: As in ``forward``.

        Returns:
            (B, T, dim) hidden states, in the model's dtype.

        Raises:
            ValueError: If the sequence is longer than max_seq_len or arguments do not fit.
        """
        b, t = tokens.shape
        if t > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {t} exceeds max_seq_len {self.config.max_seq_len}"
            )
        cache_pos = None
        if self.caches_are_enabled:
            if input_pos is None or input_pos.dim() != 1:
                raise ValueError("with a KV cache, input_pos must be given as a (T,) tensor")
            cache_pos = input_pos
            if mask is None:
                slots = torch.arange(self.layers[0].attention.kv_cache.max_seq_len,
                                     device=tokens.device)
                mask = slots[None, :] <= input_pos[:, None]  # (T, S)
        elif input_pos is None:
            input_pos = torch.arange(t, device=tokens.device)
        if mask is not None and mask.dim() == 2:
            mask = mask.unsqueeze(0)  # (1, T, S)
        rope = rope_cache(input_pos, self.config.head_dim, self.config.rope_theta)

        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            if layer.use_checkpoint and torch.is_grad_enabled():
                h = checkpoint(layer, h, rope, mask, cache_pos, use_reentrant=False)
            else:
                h = layer(h, rope, mask, cache_pos)
        return self.norm(h)
