"""One decoder for every family tune fine-tunes: config, modules and numerics (torch only).

Llama 2, Llama 3.x, Mistral and Qwen2.5 are the same pre-norm transformer with SwiGLU and
rotary embeddings; they differ in sizes and in a few switches, all of them fields of
:class:`DecoderConfig`: grouped-query attention with an explicit ``head_dim``, biases on the
q/k/v projection (Qwen2), one matrix for the input and output embeddings (Llama 3.2 1B/3B,
Qwen2.5 up to 3B), Llama 3.1's RoPE frequency scaling, and Mistral's sliding-window attention.
The presets of each family and what else tune knows about it live in ``families.py``.

The parameter names below are the *native key schema* that tune-ckpt converts to and from; see
the package README for the full table. Two choices define it:

* Attention has ONE fused projection ``wqkv`` whose output rows are laid out
  ``[Q heads | K heads | V heads]`` (n_heads*head_dim, then n_kv_heads*head_dim twice). One
  matmul instead of three is faster at every size, and the split is a free view. A q/k/v bias
  is one ``wqkv.bias`` in the same layout.
* Rotary embeddings use Meta's convention: dimension pairs ``(2i, 2i+1)`` of each head are
  rotated together, so Meta's ``wq``/``wk`` rows are taken as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tune_models.kv_cache import KVCache
from tune_models.loss import linear_cross_entropy

# The fields of a rope_scaling dict, by rope_type. The names are transformers' (and Meta's
# params.json's), so a config.json's rope_scaling carries over as it is.
ROPE_SCALING_FIELDS = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}


@dataclass
class DecoderConfig:
    """Shape of a decoder of any supported family.

    Every field is a plain JSON value, so ``vars(config)`` is what a checkpoint's
    ``tune_model.json`` holds and ``DecoderConfig(**json.load(f))`` rebuilds the model.

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
        head_dim: Size of one attention head; None means dim // n_heads.
        qkv_bias: Whether the q/k/v projection has a bias (Qwen2).
        tie_embeddings: Whether the output projection is the input embedding matrix (then the
            model has no ``output.weight`` parameter).
        rope_scaling: None, or a dict with ``rope_type`` "llama3" and the fields in
            ``ROPE_SCALING_FIELDS["llama3"]`` (Llama 3.1's long-context frequency scaling).
        sliding_window: If set, a query attends to at most this many positions: itself and
            the sliding_window - 1 before it (Mistral v0.1: 4096).

    Raises:
        ValueError: When the sizes do not fit together or a field has a bad value.
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
    head_dim: int | None = None
    qkv_bias: bool = False
    tie_embeddings: bool = False
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len",
                     "multiple_of", "hidden_dim", "head_dim", "sliding_window"):
            _check_size(name, getattr(self, name))
        for name in ("norm_eps", "rope_theta", "ffn_dim_multiplier"):
            _check_positive_number(name, getattr(self, name))
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(
                    f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}), "
                    f"or give head_dim"
                )
            self.head_dim = self.dim // self.n_heads
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be positive and even for RoPE")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
            )
        for name in ("qkv_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
        if self.hidden_dim is None:
            # Meta's rule: 2/3 of 4*dim (SwiGLU has three matrices), optionally scaled, then
            # rounded up to multiple_of. 7B: 4096 -> 11008.
            hidden = int(2 * 4 * self.dim / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * math.ceil(hidden / self.multiple_of)
            if self.hidden_dim > MAX_SIZE:
                raise ValueError(
                    f"the FFN width from dim, ffn_dim_multiplier and multiple_of is "
                    f"{self.hidden_dim:,}, larger than any model's (at most {MAX_SIZE:,}): "
                    "check those values"
                )


# Far above any published model (the deepest have ~130 layers, the widest sizes ~10^5, the
# longest context ~10^7): a bigger number is a typo, and building from it would spend memory
# and minutes before failing. A block is Python objects, so depth has its own, lower bound.
MAX_SIZE = 2**24
MAX_LAYERS = 2**16
_OPTIONAL_SIZES = ("hidden_dim", "head_dim", "sliding_window")


def _check_size(name: str, value: Any) -> None:
    if value is None and name in _OPTIONAL_SIZES:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value <= 0:
        none = " or None" if name in _OPTIONAL_SIZES else ""
        raise ValueError(f"{name} must be positive{none}, got {value}")
    limit = MAX_LAYERS if name == "n_layers" else MAX_SIZE
    if value > limit:
        raise ValueError(f"{name} {value:,} is larger than any model's (at most {limit:,}): "
                         "check the value")


def _check_positive_number(name: str, value: Any) -> None:
    if value is None and name == "ffn_dim_multiplier":
        return
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")


def _check_rope_scaling(scaling: dict[str, Any]) -> None:
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or None, got {scaling!r}")
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALING_FIELDS:
        raise ValueError(
            f"rope_scaling type {kind!r} is not supported (supported: "
            f"{', '.join(ROPE_SCALING_FIELDS)}); set rope_type to one of them or rope_scaling "
            f"to None"
        )
    expected = set(ROPE_SCALING_FIELDS[kind])
    missing = sorted(expected - set(scaling))
    unknown = sorted(set(scaling) - expected - {"rope_type"})
    if missing or unknown:
        what = f"lacks '{missing[0]}'" if missing else f"has unknown field '{unknown[0]}'"
        raise ValueError(
            f"rope_scaling of type {kind!r} {what}; it takes {', '.join(sorted(expected))}"
        )
    for name in ROPE_SCALING_FIELDS[kind]:
        _check_positive_number(f"rope_scaling['{name}']", scaling[name])
    if scaling["low_freq_factor"] >= scaling["high_freq_factor"]:
        raise ValueError(
            f"rope_scaling: low_freq_factor ({scaling['low_freq_factor']}) must be below "
            f"high_freq_factor ({scaling['high_freq_factor']})"
        )


def rope_frequencies(
    head_dim: int, theta: float = 10000.0, scaling: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Angular frequency of each rotated pair of a head, Llama 3.1's scaling applied if given.

    Llama 3.1 stretches the context from original_max_position_embeddings to factor times
    that: pairs that turn slowly (wavelength above original / low_freq_factor) are slowed down
    by ``factor``, pairs that turn fast (below original / high_freq_factor) keep their speed,
    and those in between blend the two linearly in original / wavelength.

    Args:
        head_dim: Size of one attention head (even).
        theta: Frequency base.
        scaling: None, or a "llama3" rope_scaling dict (see :class:`DecoderConfig`).
        device: Where to make the tensor.

    Returns:
        float32 tensor of shape (head_dim // 2,).
    """
    freqs = theta ** -(
        torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )  # (D/2,)
    if scaling is None:
        return freqs
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / freqs
    blend = ((original / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    # blend is 0 for long wavelengths (all of freqs / factor), 1 for short ones (freqs as is).
    return (1 - blend) * freqs / factor + blend * freqs


def rope_cache(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0,
    scaling: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Cosines and sines of the rotary angles at the given positions.

    Computed per forward from positions rather than kept as a buffer: it costs T*head_dim/2
    trig ops (nothing next to the matmuls), survives building on the meta device, and packed
    batches (per-sample positions) and decoding (offset positions) need no special case.

    Args:
        positions: Integer positions, any shape P.
        head_dim: Size of one attention head (even).
        theta: Frequency base.
        scaling: None, or a "llama3" rope_scaling dict (see :func:`rope_frequencies`).

    Returns:
        float32 tensor of shape (*P, head_dim // 2, 2) holding (cos, sin).
    """
    freqs = rope_frequencies(head_dim, theta, scaling, device=positions.device)  # (D/2,)
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

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        qkv_out = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
        self.wqkv = nn.Linear(config.dim, qkv_out, bias=config.qkv_bias)
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
        # split, not two slices: its backward is one cat, a slice's a zero-filled full tensor.
        qk, v = qkv.split([h + kv, kv], dim=2)  # (B, T, H+KV, D), (B, T, KV, D)
        # Queries and keys are rotated together: one set of kernels instead of two.
        q, k = apply_rope(qk, rope).split([h, kv], dim=2)  # (B, T, H, D), (B, T, KV, D)
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

    def __init__(self, config: DecoderConfig):
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


class TiedOutput(nn.Module):
    """The output projection of a model with tied embeddings: ``h @ tok_embeddings.weight.T``.

    It owns no parameter, so the matrix is in the state dict once (as
    ``tok_embeddings.weight``, no ``output.weight``), safetensors never sees two names for one
    tensor, and FSDP shards it once. ``weight`` is read from the embedding at every call, so
    it follows whatever ``.to()``, ``load_state_dict(assign=True)`` or FSDP put there.
    """

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        # Kept out of the module tree on purpose: as a submodule the matrix would be listed
        # twice, under a second name.
        self.__dict__["_embedding"] = embedding

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def init_parameter_(param: torch.Tensor, name: str, n_layers: int, std: float = 0.02,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill one Decoder parameter, named by its state-dict key, as ``Decoder.init_weights``
    does; ``generator`` draws it from a stream of its own (one weight at a time, in any order).
    """
    if name.endswith("norm.weight"):
        return nn.init.ones_(param)
    if name.endswith(".bias"):
        return nn.init.zeros_(param)
    if name.endswith(("wo.weight", "w2.weight")):
        std = std / math.sqrt(2 * n_layers)
    return nn.init.normal_(param, 0.0, std, generator=generator)


class Decoder(nn.Module):
    """The decoder of every supported family (Llama 2, Llama 3.x, Mistral, Qwen2.5).

    ``model.output`` is the output projection in every family: an ``nn.Linear`` or, with tied
    embeddings, a :class:`TiedOutput`; ``model.output(h)`` and ``model.output.weight`` work
    the same either way.

    Args:
        config: Model shape.
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        if config.tie_embeddings:
            self.output = TiedOutput(self.tok_embeddings)
        else:
            self.output = nn.Linear(config.dim, config.vocab_size, bias=False)

    def init_weights(self, std: float = 0.02) -> None:
        """Random initialisation for training from scratch (pretrained weights skip this).

        Normal(0, std) everywhere, with the projections that write into the residual stream
        (wo, w2) scaled by 1/sqrt(2 * n_layers) so its variance does not grow with depth;
        biases start at zero.
        """
        for name, param in self.named_parameters():
            init_parameter_(param, name, self.config.n_layers, std)

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
                With a sliding window, the window is applied on top of any mask.
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
            # A LoRA adapter on the output (tune_models.lora) adds its low-rank term inside
            # the chunked loss, which never runs the output layer itself.
            low_rank = self.output.low_rank(h) if hasattr(self.output, "low_rank") else None
            return linear_cross_entropy(h, self.output.weight, labels, low_rank=low_rank)
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
            query_slots = input_pos  # (T,)
            key_slots = torch.arange(self.layers[0].attention.kv_cache.max_seq_len,
                                     device=tokens.device)  # (S,)
            if mask is None:
                mask = key_slots[None, :] <= query_slots[:, None]  # (T, S)
        else:
            if input_pos is None:
                input_pos = torch.arange(t, device=tokens.device)
            # Without a cache, keys are the tokens themselves: the window runs over indices
            # (within a packed document those differ exactly as its positions do).
            query_slots = key_slots = torch.arange(t, device=tokens.device)  # (T,)
        window = self.config.sliding_window
        if window is not None and key_slots.numel() > window:
            # Key slot s is visible from query slot q only if q - window < s.
            band = key_slots[None, :] > query_slots[:, None] - window  # (T, S)
            if mask is None:
                mask = band & (key_slots[None, :] <= query_slots[:, None])  # causal too
            else:
                mask = mask & band
        if mask is not None and mask.dim() == 2:
            mask = mask.unsqueeze(0)  # (1, T, S)
        rope = rope_cache(input_pos, self.config.head_dim, self.config.rope_theta,
                          self.config.rope_scaling)

        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            if layer.use_checkpoint and torch.is_grad_enabled():
                h = checkpoint(layer, h, rope, mask, cache_pos, use_reentrant=False)
            else:
                h = layer(h, rope, mask, cache_pos)
        return self.norm(h)
