"""Key maps between the Meta, Hugging Face and native Llama 2 layouts.

Native keys are the parameter names of ``tune_models.Llama2`` (see tune-models' README):
attention has one fused ``wqkv`` whose rows are ``[Q heads | K heads | V heads]`` and RoPE uses
Meta's interleaved pairs. Each map here is data in, data out, and comes in two forms:

* ``meta_to_native(sd, n_heads=..., n_kv_heads=...) -> dict``: plain functions on in-memory
  state dicts, for use from Python.
* ``plan_meta_to_native(source, shape) -> list[TensorPlan]``: the same map over lazily read
  tensors, which the streaming converter writes one at a time. The plain functions are built
  on the plans, so both forms share one implementation.

Every map checks the whole key set and every shape before it makes anything: a missing or
unexpected key, or a wrong shape, raises :class:`CheckpointError` naming the key, the expected
and the found shape.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tune_ckpt.errors import CheckpointError
from tune_ckpt.plan import (
    DictSource,
    FileRange,
    TensorPlan,
    TensorSource,
    materialize,
    slice_ranges,
)

FORMATS = ("meta", "hf", "native")
FORMAT_NAMES = {"meta": "Meta", "hf": "Hugging Face", "native": "native"}

# Keys some checkpoints carry that hold no weights: Meta's rotary table, and the rotary
# buffer old transformers versions saved. Dropped on the way in.
IGNORED_KEYS = re.compile(r"^rope\.freqs$|^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


@dataclass(frozen=True)
class ModelShape:
    """The sizes that fix every tensor shape of a Llama 2 model."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int

    def __post_init__(self) -> None:
        if self.n_heads <= 0 or self.dim % self.n_heads:
            raise CheckpointError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise CheckpointError(
                f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_args(cls, args: dict) -> ModelShape:
        """From model arguments in Llama2Config field names (hidden_dim already resolved)."""
        return cls(
            vocab_size=int(args["vocab_size"]), dim=int(args["dim"]),
            n_layers=int(args["n_layers"]), n_heads=int(args["n_heads"]),
            n_kv_heads=int(args.get("n_kv_heads") or args["n_heads"]),
            hidden_dim=int(args["hidden_dim"]),
        )


# --- expected shapes of each layout ----------------------------------------------------------


def native_shapes(s: ModelShape) -> dict[str, tuple[int, ...]]:
    """Every native key with its shape, in ``Llama2.state_dict()`` order."""
    d, q, kv = s.dim, s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    out: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (s.vocab_size, d)}
    for i in range(s.n_layers):
        p = f"layers.{i}."
        out[p + "attention_norm.weight"] = (d,)
        out[p + "attention.wqkv.weight"] = (q + 2 * kv, d)
        out[p + "attention.wo.weight"] = (d, q)
        out[p + "ffn_norm.weight"] = (d,)
        out[p + "feed_forward.w1.weight"] = (s.hidden_dim, d)
        out[p + "feed_forward.w2.weight"] = (d, s.hidden_dim)
        out[p + "feed_forward.w3.weight"] = (s.hidden_dim, d)
    out["norm.weight"] = (d,)
    out["output.weight"] = (s.vocab_size, d)
    return out


def meta_shapes(s: ModelShape) -> dict[str, tuple[int, ...]]:
    """Every key of a (merged, single-shard) Meta checkpoint with its shape."""
    d, q, kv = s.dim, s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    out: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (s.vocab_size, d)}
    for i in range(s.n_layers):
        p = f"layers.{i}."
        out[p + "attention.wq.weight"] = (q, d)
        out[p + "attention.wk.weight"] = (kv, d)
        out[p + "attention.wv.weight"] = (kv, d)
        out[p + "attention.wo.weight"] = (d, q)
        out[p + "feed_forward.w1.weight"] = (s.hidden_dim, d)
        out[p + "feed_forward.w2.weight"] = (d, s.hidden_dim)
        out[p + "feed_forward.w3.weight"] = (s.hidden_dim, d)
        out[p + "attention_norm.weight"] = (d,)
        out[p + "ffn_norm.weight"] = (d,)
    out["norm.weight"] = (d,)
    out["output.weight"] = (s.vocab_size, d)
    return out


def hf_shapes(s: ModelShape) -> dict[str, tuple[int, ...]]:
    """Every key of a transformers LlamaForCausalLM checkpoint with its shape."""
    d, q, kv = s.dim, s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s.vocab_size, d)}
    for i in range(s.n_layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = (q, d)
        out[p + "self_attn.k_proj.weight"] = (kv, d)
        out[p + "self_attn.v_proj.weight"] = (kv, d)
        out[p + "self_attn.o_proj.weight"] = (d, q)
        out[p + "mlp.gate_proj.weight"] = (s.hidden_dim, d)
        out[p + "mlp.up_proj.weight"] = (s.hidden_dim, d)
        out[p + "mlp.down_proj.weight"] = (d, s.hidden_dim)
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (d,)
    out["model.norm.weight"] = (d,)
    out["lm_head.weight"] = (s.vocab_size, d)
    return out


_SHAPES = {"meta": meta_shapes, "hf": hf_shapes, "native": native_shapes}
# Where each layout keeps the sizes that cannot be read off the embedding.
_EMBED = {"meta": "tok_embeddings.weight", "hf": "model.embed_tokens.weight",
          "native": "tok_embeddings.weight"}
_FFN = {"meta": "layers.0.feed_forward.w1.weight", "hf": "model.layers.0.mlp.gate_proj.weight",
        "native": "layers.0.feed_forward.w1.weight"}


def infer_shape(
    source: TensorSource, fmt: str, *, n_heads: int, n_kv_heads: int | None = None
) -> ModelShape:
    """Read vocab_size, dim, n_layers and hidden_dim off the tensor shapes.

    n_heads (and n_kv_heads) cannot be read off shapes: a (4096, 4096) projection fits 32 heads
    of 128 as well as 64 of 64, so the caller supplies them.
    """
    keys = [k for k in source.keys() if not IGNORED_KEYS.match(k)]
    where = source.where(keys[0]) if keys else "the state dict"
    for key in (_EMBED[fmt], _FFN[fmt]):
        if key not in keys:
            raise CheckpointError(
                f"{where} is not a {FORMAT_NAMES[fmt]} Llama 2 checkpoint: it has no '{key}'"
            )
    vocab_size, dim = source.shape(_EMBED[fmt])
    layers = {int(m.group(1)) for k in keys if (m := _LAYER.match(k))}
    return ModelShape(
        vocab_size=vocab_size, dim=dim, n_layers=max(layers) + 1, n_heads=n_heads,
        n_kv_heads=n_kv_heads or n_heads, hidden_dim=source.shape(_FFN[fmt])[0],
    )


def check_source(source: TensorSource, fmt: str, shape: ModelShape, origin: str = "") -> None:
    """Raise unless ``source`` holds exactly the keys and shapes of ``fmt`` for ``shape``.

    Args:
        source: The tensors to check (only their shapes are read).
        fmt: "meta", "hf" or "native".
        shape: The model size the shapes must match.
        origin: Where the expected sizes came from, for the message (e.g. "params.json").
    """
    expected = _SHAPES[fmt](shape)
    found = [k for k in source.keys() if not IGNORED_KEYS.match(k)]
    name = FORMAT_NAMES[fmt]
    origin = f" (sizes from {origin})" if origin else ""
    missing = [k for k in expected if k not in set(found)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        where = source.where(found[0]) if found else "the state dict"
        raise CheckpointError(
            f"{where}: missing key '{missing[0]}'{more} of a {name} checkpoint with "
            f"{shape.n_layers} layers (expected shape {expected[missing[0]]}){origin}"
        )
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        k = unexpected[0]
        raise CheckpointError(
            f"{source.where(k)}: unexpected key '{k}' with shape {source.shape(k)}: not part of "
            f"a {name} Llama 2 checkpoint with {shape.n_layers} layers{origin}"
        )
    for k in found:
        if tuple(source.shape(k)) != expected[k]:
            raise CheckpointError(
                f"{source.where(k)}: '{k}' has shape {tuple(source.shape(k))}, expected "
                f"{expected[k]}{origin}"
            )
    for k in found:
        if not source.dtype(k).is_floating_point:
            raise CheckpointError(f"{source.where(k)}: '{k}' is {source.dtype(k)}, not a float")


# --- the maps --------------------------------------------------------------------------------


def _plan(
    source: TensorSource, key: str, shape: tuple[int, ...], inputs: tuple[str, ...],
    make: Callable[..., torch.Tensor] | None = None,
    ranges: Callable[[], list[FileRange] | None] | None = None,
) -> TensorPlan:
    """One output tensor made from ``inputs`` by ``make`` (identity for one input).

    ``ranges`` says where the output's bytes lie in the source files, when they are file bytes
    as they are (identity: the input's own bytes).
    """
    dtype = source.dtype(inputs[0])
    for k in inputs[1:]:
        dtype = torch.promote_types(dtype, source.dtype(k))

    def build() -> torch.Tensor:
        tensors = [source.get(k) for k in inputs]
        return tensors[0] if make is None else make(*tensors).to(dtype)

    if make is None and ranges is None:
        ranges = lambda: source.file_ranges(inputs[0])  # noqa: E731
    return TensorPlan(key, shape, dtype, build, lambda: source.release(*inputs), ranges)


def _joined_ranges(source: TensorSource, keys: tuple[str, ...]):
    """Ranges of the row-wise concatenation of ``keys``: their bytes one after another."""

    def ranges() -> list[FileRange] | None:
        if len({source.dtype(k) for k in keys}) != 1:
            return None
        parts = [source.file_ranges(k) for k in keys]
        return None if any(p is None for p in parts) else [r for p in parts for r in p]

    return ranges


def _row_ranges(source: TensorSource, key: str, lo: int, hi: int):
    """Ranges of rows [lo, hi) of the 2-D tensor ``key``."""

    def ranges() -> list[FileRange] | None:
        found = source.file_ranges(key)
        row = source.shape(key)[1] * source.dtype(key).itemsize
        return None if found is None else slice_ranges(found, lo * row, hi * row)

    return ranges


def _cat(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat(tensors, dim=0)


def _hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # HF stores each head's q/k rows as [first halves | second halves] for its rotate-half
    # RoPE; Meta (native) pairs rows (2j, 2j+1). Interleave the halves back into pairs.
    rows, cols = w.shape
    half = rows // n_heads // 2
    return w.view(n_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)  # (H*d, D)


def _meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # The inverse of _hf_to_meta_rows: split each head's pairs into two halves.
    rows, cols = w.shape
    half = rows // n_heads // 2
    return w.view(n_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)  # (H*d, D)


def plan_meta_to_native(source: TensorSource, shape: ModelShape) -> list[TensorPlan]:
    """Meta -> native: wq, wk, wv fuse into wqkv; everything else keeps its name."""
    check_source(source, "meta", shape)
    target = native_shapes(shape)
    plans = []
    for key, out_shape in target.items():
        if key.endswith("attention.wqkv.weight"):
            p = key.removesuffix("wqkv.weight")
            qkv = (p + "wq.weight", p + "wk.weight", p + "wv.weight")
            # Row-wise concatenation of row-major tensors is their bytes end to end.
            plans.append(_plan(source, key, out_shape, qkv, _cat, _joined_ranges(source, qkv)))
        else:
            plans.append(_plan(source, key, out_shape, (key,)))
    return plans


def plan_native_to_meta(source: TensorSource, shape: ModelShape) -> list[TensorPlan]:
    """native -> Meta: wqkv splits into wq, wk, wv."""
    check_source(source, "native", shape)
    q, kv = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    spans = {"wq": (0, q), "wk": (q, q + kv), "wv": (q + kv, q + 2 * kv)}
    plans = []
    for key, out_shape in meta_shapes(shape).items():
        name = key.split(".")[-2]
        if name in spans:
            lo, hi = spans[name]
            fused = key.replace(f".{name}.", ".wqkv.")
            plans.append(_plan(source, key, out_shape, (fused,),
                               lambda w, lo=lo, hi=hi: w[lo:hi],
                               _row_ranges(source, fused, lo, hi)))
        else:
            plans.append(_plan(source, key, out_shape, (key,)))
    return plans


_HF_NAMES = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}


def _hf_name(native_key: str) -> str:
    if native_key in _HF_TOP:
        return _HF_TOP[native_key]
    layer, rest = native_key.split(".", 2)[1:]
    return f"model.layers.{layer}.{_HF_NAMES[rest]}"


def plan_hf_to_native(source: TensorSource, shape: ModelShape) -> list[TensorPlan]:
    """HF -> native: q/k rows back to Meta's RoPE pairing, then fused with v into wqkv.

    A checkpoint with tied embeddings and no ``lm_head.weight`` gets the embedding as output.
    """
    if "lm_head.weight" not in source.keys() and "model.embed_tokens.weight" in source.keys():
        source = _TiedOutput(source)
    check_source(source, "hf", shape)
    h, kvh = shape.n_heads, shape.n_kv_heads
    plans = []
    for key, out_shape in native_shapes(shape).items():
        if key.endswith("attention.wqkv.weight"):
            p = f"model.layers.{key.split('.')[1]}.self_attn."
            plans.append(_plan(
                source, key, out_shape,
                (p + "q_proj.weight", p + "k_proj.weight", p + "v_proj.weight"),
                lambda wq, wk, wv: torch.cat(
                    [_hf_to_meta_rows(wq, h), _hf_to_meta_rows(wk, kvh), wv]),
            ))
        else:
            plans.append(_plan(source, key, out_shape, (_hf_name(key),)))
    return plans


def plan_native_to_hf(source: TensorSource, shape: ModelShape) -> list[TensorPlan]:
    """native -> HF: wqkv splits into q/k/v_proj with q/k rows in HF's rotate-half order."""
    check_source(source, "native", shape)
    q, kv = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    h, kvh = shape.n_heads, shape.n_kv_heads
    split = {
        "q_proj": lambda w: _meta_to_hf_rows(w[:q], h),
        "k_proj": lambda w: _meta_to_hf_rows(w[q : q + kv], kvh),
        "v_proj": lambda w: w[q + kv :],
    }
    native_of = {_hf_name(k): k for k in native_shapes(shape) if "wqkv" not in k}
    plans = []
    for key, out_shape in hf_shapes(shape).items():
        proj = key.split(".")[-2]
        if proj in split:
            fused = f"layers.{key.split('.')[2]}.attention.wqkv.weight"
            # v keeps its rows as they are; q and k rows are permuted, so they are computed.
            ranges = _row_ranges(source, fused, q + kv, q + 2 * kv) if proj == "v_proj" else \
                (lambda: None)
            plans.append(_plan(source, key, out_shape, (fused,), split[proj], ranges))
        else:
            plans.append(_plan(source, key, out_shape, (native_of[key],)))
    return plans


def plan_native_to_native(source: TensorSource, shape: ModelShape) -> list[TensorPlan]:
    """native -> native (to change dtype or file type): checked, in canonical order."""
    check_source(source, "native", shape)
    return [_plan(source, k, s, (k,)) for k, s in native_shapes(shape).items()]


class _TiedOutput(TensorSource):
    """An HF source whose missing lm_head.weight reads the (tied) input embedding."""

    def __init__(self, inner: TensorSource):
        self._inner = inner

    def _key(self, key: str) -> str:
        return "model.embed_tokens.weight" if key == "lm_head.weight" else key

    def keys(self) -> list[str]:
        return [*self._inner.keys(), "lm_head.weight"]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._inner.shape(self._key(key))

    def dtype(self, key: str) -> torch.dtype:
        return self._inner.dtype(self._key(key))

    def get(self, key: str) -> torch.Tensor:
        return self._inner.get(self._key(key))

    def where(self, key: str) -> str:
        return self._inner.where(self._key(key))

    def release(self, *keys: str) -> None:
        self._inner.release(*(self._key(k) for k in keys))

    def file_ranges(self, key: str) -> list[FileRange] | None:
        return self._inner.file_ranges(self._key(key))


# --- plain-function forms ---------------------------------------------------------------------


def meta_to_native(
    sd: dict[str, torch.Tensor], *, n_heads: int, n_kv_heads: int | None = None
) -> dict[str, torch.Tensor]:
    """Map a (merged) Meta Llama 2 state dict to the native key schema.

    Args:
        sd: Meta keys (``layers.0.attention.wq.weight``...); ``rope.freqs`` is ignored.
        n_heads: Number of query heads.
        n_kv_heads: Number of key/value heads (default: n_heads).

    Returns:
        The native state dict (``wqkv = cat([wq, wk, wv])``).

    Raises:
        CheckpointError: On a missing or unexpected key or a wrong shape.
    """
    source = DictSource(sd)
    shape = infer_shape(source, "meta", n_heads=n_heads, n_kv_heads=n_kv_heads)
    return materialize(plan_meta_to_native(source, shape))


def native_to_meta(
    sd: dict[str, torch.Tensor], *, n_heads: int, n_kv_heads: int | None = None
) -> dict[str, torch.Tensor]:
    """Map a native state dict to Meta's key schema (a single, unsharded checkpoint).

    Args:
        sd: Native keys.
        n_heads: Number of query heads.
        n_kv_heads: Number of key/value heads (default: n_heads).

    Returns:
        The Meta state dict (wqkv split into wq, wk, wv).

    Raises:
        CheckpointError: On a missing or unexpected key or a wrong shape.
    """
    source = DictSource(sd)
    shape = infer_shape(source, "native", n_heads=n_heads, n_kv_heads=n_kv_heads)
    return materialize(plan_native_to_meta(source, shape))


def hf_to_native(
    sd: dict[str, torch.Tensor], *, n_heads: int, n_kv_heads: int | None = None
) -> dict[str, torch.Tensor]:
    """Map a transformers LlamaForCausalLM state dict to the native key schema.

    Args:
        sd: HF keys (``model.layers.0.self_attn.q_proj.weight``...).
        n_heads: ``num_attention_heads``.
        n_kv_heads: ``num_key_value_heads`` (default: n_heads).

    Returns:
        The native state dict, q/k rows permuted back to Meta's RoPE pairing.

    Raises:
        CheckpointError: On a missing or unexpected key or a wrong shape.
    """
    source = DictSource(sd)
    if "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
        source = _TiedOutput(source)
    shape = infer_shape(source, "hf", n_heads=n_heads, n_kv_heads=n_kv_heads)
    return materialize(plan_hf_to_native(source, shape))


def native_to_hf(
    sd: dict[str, torch.Tensor], *, n_heads: int, n_kv_heads: int | None = None
) -> dict[str, torch.Tensor]:
    """Map a native state dict to transformers LlamaForCausalLM keys.

    Args:
        sd: Native keys.
        n_heads: Number of query heads.
        n_kv_heads: Number of key/value heads (default: n_heads).

    Returns:
        The HF state dict, q/k rows in HF's rotate-half order.

    Raises:
        CheckpointError: On a missing or unexpected key or a wrong shape.
    """
    source = DictSource(sd)
    shape = infer_shape(source, "native", n_heads=n_heads, n_kv_heads=n_kv_heads)
    return materialize(plan_native_to_hf(source, shape))


PLANS_TO_NATIVE = {"meta": plan_meta_to_native, "hf": plan_hf_to_native,
                   "native": plan_native_to_native}
PLANS_FROM_NATIVE = {"meta": plan_native_to_meta, "hf": plan_native_to_hf,
                     "native": plan_native_to_native}
