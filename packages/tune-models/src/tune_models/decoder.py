"""One decoder for every family tune fine-tunes: config, modules and numerics (torch only).

Llama 2, Llama 3.x, Mistral, Qwen2.5, Qwen3 and Gemma 3 are the same pre-norm transformer with
a gated feed-forward and rotary embeddings; they differ in sizes and in switches, all of them
fields of :class:`DecoderConfig`: grouped-query attention with an explicit ``head_dim``, biases
on the q/k/v projection (Qwen2), RMSNorm on each query and key head (QK-norm: Qwen3, Gemma 3),
one matrix for the input and output embeddings, RoPE frequency scaling (Llama 3.1's, linear),
sliding-window attention on every layer (Mistral) or on most of them with their own RoPE base
(Gemma 3: five local layers to one global), and Gemma's details: GELU-tanh, RMSNorm gains of
(1 + weight) in fp32, norms after attention and feed-forward too, embeddings scaled by
sqrt(dim), a query scale of its own and tanh soft-capping of scores and logits (Gemma 2).
A switch that is off costs nothing: its modules are not built and its ops never run.
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
from functools import partial
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
    "linear": ("factor",),
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
        rope_scaling: None, or a dict with a ``rope_type`` and the fields
            ``ROPE_SCALING_FIELDS`` lists for it: "llama3" (Llama 3.1's long-context
            frequency scaling) or "linear" (every frequency divided by ``factor``).
        sliding_window: If set, a query attends to at most this many positions: itself and
            the sliding_window - 1 before it (Mistral v0.1: 4096), on every layer unless
            sliding_window_pattern says otherwise.
        sliding_window_pattern: With a sliding window, every n-th layer (index n-1, 2n-1,
            ...) attends to the whole sequence instead (Gemma 3: 6, five local layers to one
            global; Gemma 2: 2). None: every layer has the window.
        rope_local_theta: RoPE base of the sliding-window layers, which then take no
            rope_scaling (Gemma 3: 10000, while its global layers use rope_theta and the
            scaling). None: every layer uses rope_theta and rope_scaling.
        qk_norm: RMSNorm over head_dim on every query and key head, before RoPE (Qwen3,
            Gemma 3); its gains are ``attention.q_norm`` and ``attention.k_norm``.
        norm_unit_offset: Every RMSNorm scales by (1 + weight), in fp32, before casting back;
            its weights start at zero (Gemma). False: by weight, after the cast (Llama).
        post_norms: An RMSNorm also on the output of attention and of the feed-forward,
            before each residual add (Gemma 2 and 3).
        activation: The feed-forward's gate: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma).
        scale_embeddings: Multiply the embeddings by sqrt(dim), rounded to the weights'
            dtype (Gemma).
        query_pre_attn_scalar: Attention scores are scaled by its inverse square root
            instead of head_dim's (Gemma 3 27B: 168 with head_dim 128). None: head_dim.
        attn_logit_softcap: If set, attention scores become cap * tanh(score / cap) before
            the softmax (Gemma 2: 50). Costs SDPA's fused kernels: scores are formed whole.
        final_logit_softcap: If set, logits become cap * tanh(logit / cap) (Gemma 2: 30).

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
    sliding_window_pattern: int | None = None
    rope_local_theta: float | None = None
    qk_norm: bool = False
    norm_unit_offset: bool = False
    post_norms: bool = False
    activation: str = "silu"
    scale_embeddings: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None

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
        _check_layer_fields(self)
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


# The feed-forward's gate activation by DecoderConfig.activation.
ACTIVATIONS = {"silu": F.silu, "gelu_tanh": partial(F.gelu, approximate="tanh")}


def _check_layer_fields(config: DecoderConfig) -> None:
    # The checks of the fields that QK-norm, Gemma's layers and local/global attention added.
    for name in ("qk_norm", "norm_unit_offset", "post_norms", "scale_embeddings"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name} must be true or false, got {getattr(config, name)!r}")
    if config.activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got "
                         f"{config.activation!r}")
    for name in ("rope_local_theta", "query_pre_attn_scalar", "attn_logit_softcap",
                 "final_logit_softcap"):
        if getattr(config, name) is not None:
            _check_positive_number(name, getattr(config, name))
    pattern = config.sliding_window_pattern
    if pattern is not None:
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 2:
            raise ValueError(f"sliding_window_pattern must be a whole number >= 2 or None, got "
                             f"{pattern!r}")
        if config.sliding_window is None:
            raise ValueError("sliding_window_pattern needs a sliding_window: set both or "
                             "neither")
    if config.rope_local_theta is not None and config.sliding_window is None:
        raise ValueError("rope_local_theta is the RoPE base of sliding-window layers, and the "
                         "model has none: set sliding_window or drop rope_local_theta")


def uses_sliding_window(config: DecoderConfig, layer: int) -> bool:
    """Whether layer ``layer`` (from 0) attends through the sliding window (a local layer)."""
    if config.sliding_window is None:
        return False
    pattern = config.sliding_window_pattern
    return pattern is None or (layer + 1) % pattern != 0


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
    if kind == "llama3" and scaling["low_freq_factor"] >= scaling["high_freq_factor"]:
        raise ValueError(
            f"rope_scaling: low_freq_factor ({scaling['low_freq_factor']}) must be below "
            f"high_freq_factor ({scaling['high_freq_factor']})"
        )


def rope_frequencies(
    head_dim: int, theta: float = 10000.0, scaling: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Angular frequency of each rotated pair of a head, a RoPE scaling applied if given.

    "linear" divides every frequency by ``factor`` (positions are compressed; Gemma 3's
    global layers: 8). "llama3": Llama 3.1 stretches the context from
    original_max_position_embeddings to factor times that: pairs that turn slowly (wavelength
    above original / low_freq_factor) are slowed down by ``factor``, pairs that turn fast
    (below original / high_freq_factor) keep their speed, and those in between blend the two
    linearly in original / wavelength.

    Args:
        head_dim: Size of one attention head (even).
        theta: Frequency base.
        scaling: None, or a rope_scaling dict (see :class:`DecoderConfig`).
        device: Where to make the tensor.

    Returns:
        float32 tensor of shape (head_dim // 2,).
    """
    freqs = theta ** -(
        torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )  # (D/2,)
    if scaling is None:
        return freqs
    if scaling["rope_type"] == "linear":
        return freqs / scaling["factor"]
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
        scaling: None, or a rope_scaling dict (see :func:`rope_frequencies`).

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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             unit_offset: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension of x, computed in fp32.

    Args:
        x: (..., D) input.
        weight: Gains broadcasting against x, (D,) or e.g. (H, D) for one per head.
        eps: Added to the mean square.
        unit_offset: Gemma's variant: scale by (1 + weight) in fp32, then cast back. Else
            Llama's: cast back, then scale by weight (in x's dtype).

    Returns:
        Tensor shaped and typed like x.
    """
    normed = F.rms_norm(x.float(), x.shape[-1:], eps=eps)
    if unit_offset:
        return (normed * (1.0 + weight.float())).type_as(x)
    return normed.type_as(x) * weight


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(x / cap)``: x squashed smoothly into (-cap, cap); x itself if cap is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        # Gemma stores the gain minus one: zero is the identity.
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.unit_offset)


def _norm(config: DecoderConfig, dim: int) -> RMSNorm:
    return RMSNorm(dim, config.norm_eps, config.norm_unit_offset)


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: torch.Tensor | None, scale: float | None,
                         cap: float) -> torch.Tensor:
    """Attention whose scores are soft-capped before the softmax (Gemma 2).

    SDPA has no hook between the scores and the softmax, so the (B, H, T, S) scores are formed
    whole; only models that set attn_logit_softcap pay for it.

    Args:
        q: (B, H, T, D) queries.
        k: (B, H, S, D) keys.
        v: (B, H, S, D) values.
        mask: Boolean, broadcasting to (B, H, T, S), True = may attend; None: causal (the
            last T of S positions).
        scale: Score scale; None: 1 / sqrt(D).
        cap: The soft cap.

    Returns:
        (B, H, T, D).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = softcap((q @ k.transpose(-2, -1)) * scale, cap)  # (B, H, T, S)
    if mask is None:
        t, s = scores.shape[-2:]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)  # (T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).type_as(q) @ v


class Attention(nn.Module):
    """Grouped-query self-attention with a fused QKV projection and rotary embeddings,
    optionally QK-norm, its own score scale and soft-capped scores."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        qkv_out = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
        self.wqkv = nn.Linear(config.dim, qkv_out, bias=config.qkv_bias)
        self.q_norm = _norm(config, config.head_dim) if config.qk_norm else None
        self.k_norm = _norm(config, config.head_dim) if config.qk_norm else None
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        scalar = config.query_pre_attn_scalar
        self.scale = None if scalar is None else scalar ** -0.5  # None: SDPA's 1/sqrt(D)
        self.softcap = config.attn_logit_softcap
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
        if self.q_norm is not None:
            # Every q and k head normalised in one pass: each head's row of gains is its
            # projection's (both in the native RoPE order of its dimensions).
            gain = torch.cat([self.q_norm.weight.expand(h, -1),
                              self.k_norm.weight.expand(kv, -1)])  # (H+KV, D)
            qk = rms_norm(qk, gain, self.q_norm.eps, self.q_norm.unit_offset)
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
        if mask is not None:
            mask = mask.unsqueeze(1)  # (B, 1, T, S): one mask for every head
        if self.softcap is not None:
            y = softcapped_attention(q, k, v, mask, self.scale, self.softcap)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        y = y.transpose(1, 2).reshape(b, t, h * self.head_dim)  # (B, T, H*D)
        return self.wo(y)


class FeedForward(nn.Module):
    """A gated feed-forward: w2(act(w1 x) * w3 x); SwiGLU with silu, GeGLU with gelu_tanh."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "silu"):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm attention and feed-forward, each with a residual connection (and with
    ``post_norms`` a norm on each output before its residual add: Gemma's sandwich).

    ``sliding`` says whether this layer attends through the sliding window (a local layer);
    the decoder hands each layer the mask and RoPE angles of its kind.

    ``use_checkpoint`` is the activation-checkpointing hook point: tune-train sets it, and the
    model then recomputes this block's activations in backward instead of storing them. The
    parameter names do not change, so checkpoints and FSDP wrapping are unaffected.

    Args:
        config: Model shape.
        layer: The block's index (from 0), which decides whether it is local or global.
    """

    def __init__(self, config: DecoderConfig, layer: int):
        super().__init__()
        self.sliding = uses_sliding_window(config, layer)
        self.attention_norm = _norm(config, config.dim)
        self.attention = Attention(config)
        self.attention_post_norm = _norm(config, config.dim) if config.post_norms else None
        self.ffn_norm = _norm(config, config.dim)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim, config.activation)
        self.ffn_post_norm = _norm(config, config.dim) if config.post_norms else None
        self.use_checkpoint = False

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        a = self.attention(self.attention_norm(x), rope, mask, cache_pos)
        if self.attention_post_norm is not None:
            a = self.attention_post_norm(a)
        h = x + a
        f = self.feed_forward(self.ffn_norm(h))
        if self.ffn_post_norm is not None:
            f = self.ffn_post_norm(f)
        return h + f


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
                    generator: torch.Generator | None = None, *,
                    norm_unit_offset: bool = False) -> torch.Tensor:
    """Fill one Decoder parameter, named by its state-dict key, as ``Decoder.init_weights``
    does; ``generator`` draws it from a stream of its own (one weight at a time, in any order).
    With ``norm_unit_offset`` (the config's) norm gains start at zero: a gain of one.
    """
    if name.endswith("norm.weight"):
        return nn.init.zeros_(param) if norm_unit_offset else nn.init.ones_(param)
    if name.endswith(".bias"):
        return nn.init.zeros_(param)
    if name.endswith(("wo.weight", "w2.weight")):
        std = std / math.sqrt(2 * n_layers)
    return nn.init.normal_(param, 0.0, std, generator=generator)


class Decoder(nn.Module):
    """The decoder of every supported family (Llama 2, Llama 3.x, Mistral, Qwen2.5, Qwen3,
    Gemma 3).

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
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = _norm(config, config.dim)
        if config.tie_embeddings:
            self.output = TiedOutput(self.tok_embeddings)
        else:
            self.output = nn.Linear(config.dim, config.vocab_size, bias=False)

    def init_weights(self, std: float = 0.02) -> None:
        """Random initialisation for training from scratch (pretrained weights skip this).

        Normal(0, std) everywhere, with the projections that write into the residual stream
        (wo, w2) scaled by 1/sqrt(2 * n_layers) so its variance does not grow with depth;
        biases start at zero, norm gains at one.
        """
        for name, param in self.named_parameters():
            init_parameter_(param, name, self.config.n_layers, std,
                            norm_unit_offset=self.config.norm_unit_offset)

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
            (B, T, vocab_size) logits (soft-capped with final_logit_softcap), or the fp32
            scalar sum of token losses if labels given.

        Raises:
            ValueError: If the sequence is longer than max_seq_len or arguments do not fit.
        """
        h = self.hidden_states(tokens, input_pos, mask)
        if labels is not None:
            # A LoRA adapter on the output (tune_models.lora) adds its low-rank term inside
            # the chunked loss, which never runs the output layer itself.
            low_rank = self.output.low_rank(h) if hasattr(self.output, "low_rank") else None
            return linear_cross_entropy(h, self.output.weight, labels, low_rank=low_rank,
                                        softcap=self.config.final_logit_softcap)
        return self.logits(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., dim) -> logits (..., vocab_size): the output projection, then
        final_logit_softcap if the model has one."""
        return softcap(self.output(h), self.config.final_logit_softcap)

    def hidden_states(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final, normalised hidden states: ``forward`` without the output projection.

        For callers that need logits at a few positions only (the last prompt position when
        decoding, the continuation tokens when scoring): ``model.logits(h[:, -1])`` costs one
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
        config = self.config
        # Local (sliding-window) layers get a banded mask and, with rope_local_theta, their
        # own angles; global layers the plain mask and angles. A model without a window
        # computes only the latter.
        window = config.sliding_window
        local_mask = mask
        if window is not None and key_slots.numel() > window:
            # Key slot s is visible from query slot q only if q - window < s.
            band = key_slots[None, :] > query_slots[:, None] - window  # (T, S)
            if mask is None:
                local_mask = band & (key_slots[None, :] <= query_slots[:, None])  # causal too
            else:
                local_mask = mask & band
        if mask is not None and mask.dim() == 2:
            mask = mask.unsqueeze(0)  # (1, T, S)
        if local_mask is not None and local_mask.dim() == 2:
            local_mask = local_mask.unsqueeze(0)  # (1, T, S)
        rope = rope_cache(input_pos, config.head_dim, config.rope_theta, config.rope_scaling)
        local_rope = rope
        if config.rope_local_theta is not None:
            local_rope = rope_cache(input_pos, config.head_dim, config.rope_local_theta)

        h = self.tok_embeddings(tokens)  # (B, T, dim)
        if config.scale_embeddings:
            # Gemma multiplies by sqrt(dim) rounded to the weights' dtype (33.94 -> 34.0 in bf16).
            h = h * torch.tensor(config.dim ** 0.5, dtype=h.dtype)
        for layer in self.layers:
            args = (local_rope, local_mask) if layer.sliding else (rope, mask)
            if layer.use_checkpoint and torch.is_grad_enabled():
                h = checkpoint(layer, h, *args, cache_pos, use_reentrant=False)
            else:
                h = layer(h, *args, cache_pos)
        return self.norm(h)
