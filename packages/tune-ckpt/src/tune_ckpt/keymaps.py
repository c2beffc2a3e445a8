"""Key maps between the Meta, Hugging Face and native layouts, for every model family.

What a checkpoint of a given model holds is not restated here: the native keys and their shapes
come from ``tune_models.native_shapes(config)`` and each layout's names from the family's key
templates (``tune_models.FAMILIES[name].checkpoint_keys``). This module adds only what the
templates do not say about a layout:

* whether it stores each head's q/k rows in Hugging Face's rotate-half order (native and Meta
  pair rows (2j, 2j+1); see tune-models' README), and with them the QK-norm gains, which are
  one head's rows (``tune_models.HEAD_ROW_KEYS``);
* where a model with tied embeddings keeps its output matrix: stored (Meta's reference code
  has a separate ``output.weight`` and its Llama 3.2 files hold a copy), optional
  (transformers' ``save_pretrained`` writes none, but older saves list the shared matrix
  under both names) or absent (native: one name per tensor).

Each map is data in, data out, in two forms:

* ``hf_to_native(sd, n_heads=..., n_kv_heads=...) -> dict``: plain functions on in-memory
  state dicts, for use from Python (the rest of the shape is read off the tensors).
* ``plan_to_native(source, config, layout) -> list[TensorPlan]``: the same map over lazily read
  tensors, which the streaming converter writes one at a time. The plain functions are built
  on the plans, so both forms share one implementation.

Every map checks the whole key set and every shape before it makes anything: a missing or
unexpected key, or a wrong shape, raises :class:`CheckpointError` naming the key, the expected
and the found shape.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
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
from tune_models import (
    HEAD_ROW_KEYS,
    HF_KEYS,
    META_KEYS,
    NATIVE_KEYS,
    DecoderConfig,
    checkpoint_key_map,
    qkv_rows,
)
from tune_models import native_shapes as _native_shapes

FORMATS = ("meta", "hf", "native")
FORMAT_NAMES = {"meta": "Meta", "hf": "Hugging Face", "native": "native"}

# Keys some checkpoints carry that hold no weights: Meta's rotary table, and the rotary
# buffer old transformers versions saved. Dropped on the way in.
IGNORED_KEYS = re.compile(r"^rope\.freqs$|^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")

KeyTemplates = dict[str, str | tuple[str, ...]]


@dataclass(frozen=True)
class Layout:
    """What a checkpoint layout does beyond naming tensors (see the module docstring).

    Attributes:
        name: "meta", "hf" or "native".
        rotate_half: q/k rows (and bias entries) of each head are in rotate-half order.
        tied_output: A tied model's output matrix, under the output's name, is "stored"
            (written, and required on reading), "optional" (not written; accepted and
            dropped on reading) or "absent".
    """

    name: str
    rotate_half: bool
    tied_output: str

    @property
    def title(self) -> str:
        return FORMAT_NAMES[self.name]


LAYOUTS = {
    "meta": Layout("meta", rotate_half=False, tied_output="stored"),
    "hf": Layout("hf", rotate_half=True, tied_output="optional"),
    "native": Layout("native", rotate_half=False, tied_output="absent"),
}


def native_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Every native key with its shape, in ``Decoder.state_dict()`` order (tune-models' rule)."""
    return _native_shapes(config)


def key_map(config: DecoderConfig, templates: KeyTemplates,
            what: str = "this layout") -> dict[str, tuple[str, ...]]:
    """Native key -> its source key(s) in a layout, for this model (see
    ``tune_models.checkpoint_key_map``), refusing a model the layout cannot hold."""
    try:
        return checkpoint_key_map(config, templates)
    except ValueError as e:
        raise CheckpointError(f"{what} cannot hold this model: {e}") from e


def _output_key(templates: KeyTemplates) -> str:
    return templates["output.weight"]


def _one_head(key: str) -> bool:
    """Whether a native key holds one head's dimensions (a QK-norm gain)."""
    return key.startswith("layers.") and "layers.{i}." + key.split(".", 2)[2] in HEAD_ROW_KEYS


def layout_shapes(config: DecoderConfig, layout: Layout,
                  templates: KeyTemplates) -> dict[str, tuple[int, ...]]:
    """Every key a checkpoint of ``config`` holds in ``layout``, with its shape."""
    native = native_shapes(config)
    rows = qkv_rows(config)
    out: dict[str, tuple[int, ...]] = {}
    for key, sources in key_map(config, templates, f"the {layout.title} layout").items():
        shape = native[key]
        if len(sources) == 1:
            out[sources[0]] = shape
        else:  # [Q | K | V] along the rows
            for source, n in zip(sources, rows):
                out[source] = (n, *shape[1:])
    if config.tie_embeddings and layout.tied_output == "stored":
        out[_output_key(templates)] = native["tok_embeddings.weight"]
    return out


# --- checking a source -----------------------------------------------------------------------


def check_source(
    source: TensorSource,
    expected: dict[str, tuple[int, ...]],
    what: str,
    origin: str = "",
    optional: dict[str, tuple[int, ...]] | None = None,
) -> None:
    """Raise unless ``source`` holds exactly the ``expected`` keys and shapes.

    Args:
        source: The tensors to check (only their shapes are read).
        expected: Key -> shape.
        what: What the checkpoint should be, for messages (e.g. "Hugging Face qwen2
            checkpoint with 24 layers").
        origin: The file the expected sizes came from (e.g. ".../config.json"), which a
            message names: one of another model is a common cause.
        optional: Keys that may be there too (a tied model's stored output matrix), with
            the shape they must have.
    """
    optional = optional or {}
    found = [k for k in source.keys() if not IGNORED_KEYS.match(k)]
    blame = (f" (the model as {origin} describes it: check that it came with these weights)"
             if origin else "")
    missing = [k for k in expected if k not in set(found)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        where = source.where(found[0]) if found else "the state dict"
        raise CheckpointError(
            f"{where}: missing key '{missing[0]}'{more} of a {what} (expected shape "
            f"{expected[missing[0]]}){blame}"
        )
    unexpected = [k for k in found if k not in expected and k not in optional]
    if unexpected:
        k = unexpected[0]
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"{source.where(k)}: unexpected key '{k}' with shape {source.shape(k)}{more}: not "
            f"part of a {what}{blame}"
        )
    for k in found:
        want = expected.get(k, optional.get(k))
        if tuple(source.shape(k)) != want:
            raise CheckpointError(
                f"{source.where(k)}: '{k}' has shape {tuple(source.shape(k))}, expected "
                f"{want} for a {what}{blame}"
            )
    for k in found:
        if not source.dtype(k).is_floating_point:
            raise CheckpointError(f"{source.where(k)}: '{k}' is {source.dtype(k)}, not a float")


def check_model_fits(
    checkpoint: TensorSource | Mapping[str, torch.Tensor],
    config: DecoderConfig,
    layout: str = "native",
    templates: KeyTemplates | None = None,
    *,
    family: str | None = None,
    origin: str = "",
    where: str | None = None,
) -> None:
    """Raise unless a checkpoint holds exactly the tensors of ``config`` in ``layout``.

    Only names and shapes are read (file headers; a mapped file's data stays on disk), so
    call it before building or allocating anything: the layer count is compared first, off
    the names, so that a shape file declaring a million layers costs nothing.

    Args:
        checkpoint: Its tensors: a lazily read source or a state dict (e.g. ``load_native``'s).
        config: The model the shape file declares.
        layout: "native", "hf" or "meta".
        templates: The layout's key templates (default: the native keys, or tune-models'
            HF_KEYS / META_KEYS; pass the family's for another family's names).
        family: The family's name, for messages.
        origin: The shape file ``config`` came from (tune_model.json, config.json,
            params.json), which a message names.
        where: The weights file, for messages, when ``checkpoint`` is a state dict.

    Raises:
        CheckpointError: Naming the file, the first missing, unexpected or misshapen key (or
            the layer count) and what the shape file declares.
    """
    source = checkpoint if isinstance(checkpoint, TensorSource) else \
        DictSource(checkpoint, dict.fromkeys(checkpoint, where) if where else None)
    lay = LAYOUTS[layout]
    templates = templates or {"native": NATIVE_KEYS, "hf": HF_KEYS, "meta": META_KEYS}[layout]
    keys = [k for k in source.keys() if not IGNORED_KEYS.match(k)]
    found = {int(m.group(1)) for k in keys if (m := _LAYER.match(k))}
    layers = max(found) + 1 if found else 0
    if layers != config.n_layers:
        # config.json spells the field as transformers does
        field = "num_hidden_layers" if origin.endswith("config.json") else "n_layers"
        declared = f"{origin} declares {field}" if origin else "the model has n_layers"
        first = next((k for k in keys if _LAYER.match(k)), None)
        at = source.where(first) if first is not None else \
            (source.where(keys[0]) if keys else where or "the state dict")
        raise CheckpointError(
            f"{at}: the weights hold {layers} layer{'s' if layers != 1 else ''}, but "
            f"{declared} {config.n_layers}: "
            + ("that file describes another model (correct it, or use the one that came with "
               "these weights)" if origin else "they are another model's")
        )
    expected = layout_shapes(config, lay, templates)
    optional = {}
    if config.tie_embeddings and lay.tied_output == "optional":
        # The tied matrix listed under the output's name too: it maps to nothing.
        optional[_output_key(templates)] = native_shapes(config)["tok_embeddings.weight"]
    check_source(source, expected, describe(config, lay, family), origin, optional)


def describe(config: DecoderConfig, layout: Layout, family: str | None = None) -> str:
    """E.g. "Hugging Face qwen2 checkpoint with 24 layers", for messages."""
    family = f" {family}" if family else ""
    return f"{layout.title}{family} checkpoint with {config.n_layers} layers"


# --- q/k row order ---------------------------------------------------------------------------


def hf_to_native_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q or k rows (a weight, or a bias) from HF's rotate-half order to Meta's pairs.

    HF stores each head's rows as [first halves | second halves] for its rotate-half RoPE;
    native (Meta) rotates rows (2j, 2j+1) together, so the halves are interleaved back.

    Args:
        w: (n_heads * head_dim, ...) rows of q_proj or k_proj, weight or bias.
        n_heads: Heads in ``w`` (query heads for q, key/value heads for k).
    """
    rows, rest = w.shape[0], w.shape[1:]
    half = rows // n_heads // 2
    return w.view(n_heads, 2, half, *rest).transpose(1, 2).reshape(rows, *rest)  # (H*d, ...)


def native_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`hf_to_native_rows`: each head's pairs split into two halves."""
    rows, rest = w.shape[0], w.shape[1:]
    half = rows // n_heads // 2
    return w.view(n_heads, half, 2, *rest).transpose(1, 2).reshape(rows, *rest)  # (H*d, ...)


# --- plans -----------------------------------------------------------------------------------


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
    """Ranges of rows [lo, hi) of ``key`` (a row of a 1-D tensor is one element)."""

    def ranges() -> list[FileRange] | None:
        found = source.file_ranges(key)
        row = source.dtype(key).itemsize
        for size in source.shape(key)[1:]:
            row *= size
        return None if found is None else slice_ranges(found, lo * row, hi * row)

    return ranges


def _no_ranges() -> None:
    return None


def plan_to_native(
    source: TensorSource, config: DecoderConfig, layout: Layout, templates: KeyTemplates,
    *, family: str | None = None, origin: str = "",
) -> list[TensorPlan]:
    """Any layout -> native: q/k rows to Meta's pairs where needed, q, k, v fused into wqkv.

    Args:
        source: The checkpoint's tensors.
        config: The model they must make.
        layout: The source's layout.
        templates: The source's key templates (the family's for that layout).
        family: The family's name, for messages.
        origin: Where ``config`` came from, for messages.
    """
    check_model_fits(source, config, layout.name, templates, family=family, origin=origin)
    shapes = native_shapes(config)
    heads = (config.n_heads, config.n_kv_heads)
    plans = []
    for key, sources in key_map(config, templates).items():
        shape = shapes[key]
        if len(sources) == 1 and layout.rotate_half and _one_head(key):
            plans.append(_plan(source, key, shape, sources,
                               lambda w: hf_to_native_rows(w, 1), _no_ranges))
        elif len(sources) == 1:
            plans.append(_plan(source, key, shape, sources))
        elif layout.rotate_half:
            def fuse(q, k, v, heads=heads):
                return torch.cat([hf_to_native_rows(q, heads[0]),
                                  hf_to_native_rows(k, heads[1]), v])

            plans.append(_plan(source, key, shape, sources, fuse, _no_ranges))
        else:
            # Row-wise concatenation of row-major tensors is their bytes end to end.
            plans.append(_plan(source, key, shape, sources, _cat,
                               _joined_ranges(source, sources)))
    return plans


def plan_from_native(
    source: TensorSource, config: DecoderConfig, layout: Layout, templates: KeyTemplates,
    *, family: str | None = None, origin: str = "",
) -> list[TensorPlan]:
    """native -> any layout: wqkv split into q, k, v, q/k rows reordered where needed.

    Args:
        source: Native tensors (a checkpoint, or the plans of a conversion to native).
        config: The model they make.
        layout: The target layout.
        templates: The target's key templates (the family's for that layout).
        family: The family's name, for messages.
        origin: Where ``config`` came from, for messages.
    """
    check_model_fits(source, config, family=family, origin=origin)
    mapping = key_map(config, templates, f"the {layout.title} layout")
    target_shapes = layout_shapes(config, layout, templates)
    q, kv, _ = qkv_rows(config)
    spans = ((0, q), (q, q + kv), (q + kv, q + 2 * kv))
    permute = (config.n_heads, config.n_kv_heads, None) if layout.rotate_half else (None,) * 3
    plans = []
    for key, targets in mapping.items():
        if len(targets) == 1 and layout.rotate_half and _one_head(key):
            plans.append(_plan(source, targets[0], target_shapes[targets[0]], (key,),
                               lambda w: native_to_hf_rows(w, 1), _no_ranges))
            continue
        if len(targets) == 1:
            plans.append(_plan(source, targets[0], target_shapes[targets[0]], (key,)))
            continue
        for target, (lo, hi), heads in zip(targets, spans, permute):
            if heads is None:
                plans.append(_plan(source, target, target_shapes[target], (key,),
                                   lambda w, lo=lo, hi=hi: w[lo:hi],
                                   _row_ranges(source, key, lo, hi)))
            else:  # permuted rows: computed, not copied
                plans.append(_plan(source, target, target_shapes[target], (key,),
                                   lambda w, lo=lo, hi=hi, h=heads:
                                   native_to_hf_rows(w[lo:hi], h),
                                   _no_ranges))
    if config.tie_embeddings and layout.tied_output == "stored":
        output = _output_key(templates)
        plans.append(_plan(source, output, target_shapes[output], ("tok_embeddings.weight",)))
    return plans


def _cat(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat(tensors, dim=0)


# --- reading a model's shape off its tensors -------------------------------------------------


def infer_config(
    source: TensorSource, layout: Layout, templates: KeyTemplates, *, n_heads: int,
    n_kv_heads: int | None = None,
) -> DecoderConfig:
    """The model a state dict holds, as far as tensor shapes tell.

    vocab_size, dim, n_layers, hidden_dim, head_dim, q/k/v biases, QK-norm and tied
    embeddings (no output matrix) are read off the tensors. n_heads (and n_kv_heads) cannot
    be: a (4096, 4096) projection fits 32 heads of 128 as well as 64 of 64, so the caller
    supplies them.
    Nothing else (norm_eps, RoPE) changes a tensor, so the rest keeps its defaults.
    """
    keys = [k for k in source.keys() if not IGNORED_KEYS.match(k)]
    where = source.where(keys[0]) if keys else "the state dict"

    def name(native: str) -> str:
        template = templates[native.replace("layers.0.", "layers.{i}.")]
        return (template if isinstance(template, str) else template[0]).format(i=0)

    embed, w1 = name("tok_embeddings.weight"), name("layers.0.feed_forward.w1.weight")
    wo = name("layers.0.attention.wo.weight")
    for key in (embed, w1, wo):
        if key not in keys:
            raise CheckpointError(
                f"{where} is not a {layout.title} checkpoint: it has no '{key}'"
            )
    vocab_size, dim = source.shape(embed)
    layers = {int(m.group(1)) for k in keys if (m := _LAYER.match(k))}
    bias = "layers.{i}.attention.wqkv.bias" in templates and \
        name("layers.0.attention.wqkv.bias") in keys
    qk_norm = "layers.{i}.attention.q_norm.weight" in templates and \
        name("layers.0.attention.q_norm.weight") in keys
    try:
        return DecoderConfig(
            vocab_size=vocab_size, dim=dim, n_layers=max(layers) + 1, n_heads=n_heads,
            n_kv_heads=n_kv_heads or n_heads, hidden_dim=source.shape(w1)[0],
            head_dim=source.shape(wo)[1] // n_heads, qkv_bias=bias, qk_norm=qk_norm,
            tie_embeddings=name("output.weight") not in keys,
        )
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e


# --- plain-function forms ---------------------------------------------------------------------


def _to_native(sd, layout: str, templates: KeyTemplates, n_heads: int, n_kv_heads: int | None):
    source = DictSource(sd)
    config = infer_config(source, LAYOUTS[layout], templates, n_heads=n_heads,
                          n_kv_heads=n_kv_heads)
    return materialize(plan_to_native(source, config, LAYOUTS[layout], templates))


def _from_native(sd, layout: str, templates: KeyTemplates, n_heads: int,
                 n_kv_heads: int | None):
    source = DictSource(sd)
    config = infer_config(source, LAYOUTS["native"], NATIVE_KEYS, n_heads=n_heads,
                          n_kv_heads=n_kv_heads)
    return materialize(plan_from_native(source, config, LAYOUTS[layout], templates))


def meta_to_native(
    sd: dict[str, torch.Tensor], *, n_heads: int, n_kv_heads: int | None = None
) -> dict[str, torch.Tensor]:
    """Map a (merged) Meta state dict (Llama 2 or 3) to the native key schema.

    Args:
        sd: Meta keys (``layers.0.attention.wq.weight``...); ``rope.freqs`` is ignored.
            Without ``output.weight`` the model is taken to have tied embeddings.
        n_heads: Number of query heads.
        n_kv_heads: Number of key/value heads (default: n_heads).

    Returns:
        The native state dict (``wqkv = cat([wq, wk, wv])``).

    Raises:
        CheckpointError: On a missing or unexpected key or a wrong shape.
    """
    return _to_native(sd, "meta", META_KEYS, n_heads, n_kv_heads)


def native_to_meta(
    sd: dict[str, torch.Tensor], *, n_heads: int, n_kv_heads: int | None = None
) -> dict[str, torch.Tensor]:
    """Map a native state dict to Meta's key schema (a single, unsharded checkpoint).

    Args:
        sd: Native keys; with tied embeddings (no ``output.weight``) the result holds the
            embedding as ``output.weight`` too, as Meta's files do.
        n_heads: Number of query heads.
        n_kv_heads: Number of key/value heads (default: n_heads).

    Returns:
        The Meta state dict (wqkv split into wq, wk, wv).

    Raises:
        CheckpointError: On a missing or unexpected key or a wrong shape, or q/k/v biases
            (Meta's layout has none).
    """
    return _from_native(sd, "meta", META_KEYS, n_heads, n_kv_heads)


def hf_to_native(
    sd: dict[str, torch.Tensor], *, n_heads: int, n_kv_heads: int | None = None
) -> dict[str, torch.Tensor]:
    """Map a transformers Llama / Mistral / Qwen2 / Qwen3 state dict to the native key schema.

    Args:
        sd: HF keys (``model.layers.0.self_attn.q_proj.weight``...); q/k/v biases (Qwen2)
            are taken along; without ``lm_head.weight`` the model has tied embeddings.
        n_heads: ``num_attention_heads``.
        n_kv_heads: ``num_key_value_heads`` (default: n_heads).

    Returns:
        The native state dict, q/k rows (and biases) permuted back to Meta's RoPE pairing.

    Raises:
        CheckpointError: On a missing or unexpected key or a wrong shape.
    """
    return _to_native(sd, "hf", HF_KEYS, n_heads, n_kv_heads)


def native_to_hf(
    sd: dict[str, torch.Tensor], *, n_heads: int, n_kv_heads: int | None = None
) -> dict[str, torch.Tensor]:
    """Map a native state dict to transformers' Llama / Mistral / Qwen2 / Qwen3 keys.

    Args:
        sd: Native keys; with tied embeddings (no ``output.weight``) there is no
            ``lm_head.weight`` in the result, as transformers saves such a model.
        n_heads: Number of query heads.
        n_kv_heads: Number of key/value heads (default: n_heads).

    Returns:
        The HF state dict, q/k rows (and biases) in HF's rotate-half order.

    Raises:
        CheckpointError: On a missing or unexpected key or a wrong shape.
    """
    return _from_native(sd, "hf", HF_KEYS, n_heads, n_kv_heads)
