"""Meta's ``params.json`` <-> :class:`tune_models.DecoderConfig` (Llama 2 and Llama 3.x).

params.json gives the sizes in DecoderConfig's own names (``dim``, ``n_heads``,
``multiple_of``, ``ffn_dim_multiplier``...), and DecoderConfig derives the FFN width from them
with Meta's rule. What it leaves out:

* The vocabulary: Llama 2 says ``-1`` (the tokenizer's); it is read off the embedding.
* Llama 3.1/3.2's RoPE scaling: ``use_scaled_rope: true`` only. Meta's code fixes
  low_freq_factor 1, high_freq_factor 4 and an original context of 8192; the factor is 8 for
  Llama 3.1 and 32 for Llama 3.2 (transformers' conversion script takes it from a
  ``--llama_version`` flag). Here it is ``rope_scaling_factor`` from params.json if present
  (newer llama-models releases write it), else 32 for models narrower than 4096 (Llama 3.2
  1B and 3B, the only Llama 3 releases that narrow) and 8 otherwise (Llama 3.1 8B, 70B,
  405B). Add ``"rope_scaling_factor"`` to params.json to say otherwise.
* Tied embeddings: Meta's files always hold ``output.weight``; in Llama 3.2 it is a copy of the
  embedding, which is what the converter compares (see ``shards.tied_embeddings``).
* The context length: ``max_seq_len`` if present, else 131072 with scaled RoPE (3.1/3.2),
  8192 for other Llama 3 models, 4096 for Llama 2 (transformers' values).

Mistral's consolidated params.json names (``head_dim``, ``hidden_dim``, ``sliding_window``) are
read too.
"""

from __future__ import annotations

import dataclasses

from tune_ckpt.errors import CheckpointError
from tune_ckpt.hf_config import family_for
from tune_models import FAMILIES, DecoderConfig
from tune_models.families import LLAMA3_ROPE as META_ROPE  # what Meta's code hard-codes

LLAMA3_2_WIDTH = 4096  # Llama 3.2's models are narrower than this, Llama 3.1's are not


def _meta_factor(dim: int) -> float:
    return 32.0 if dim < LLAMA3_2_WIDTH else 8.0


def _meta_families() -> list:
    return [f for f in FAMILIES.values() if "meta" in f.checkpoint_keys]


def config_from_meta(
    params: dict, *, vocab_size: int | None = None, tie_embeddings: bool = False,
    where: str = "params.json",
) -> tuple[DecoderConfig, str]:
    """Meta's params.json -> (the model's DecoderConfig, its family's name).

    Args:
        params: The parsed params.json.
        vocab_size: The embedding's row count, used when params.json says -1.
        tie_embeddings: Whether the checkpoint's output matrix is its embedding.
        where: The file, for messages.

    Raises:
        CheckpointError: On a missing or bad size.
    """
    params = params.get("model", params)  # some releases nest the sizes
    fields = {k: params[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of",
                                     "ffn_dim_multiplier", "norm_eps", "rope_theta",
                                     "max_seq_len", "head_dim", "hidden_dim", "sliding_window")
              if params.get(k) is not None}
    vocab = params.get("vocab_size", -1)
    fields["vocab_size"] = vocab if isinstance(vocab, int) and vocab > 0 else vocab_size
    if fields["vocab_size"] is None:
        raise CheckpointError(f"{where}: vocab_size is {vocab} and no checkpoint to read it from")
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in fields]
    if missing:
        raise CheckpointError(f"{where}: missing '{missing[0]}'")
    fields["tie_embeddings"] = tie_embeddings
    if params.get("use_scaled_rope"):
        factor = params.get("rope_scaling_factor") or _meta_factor(fields["dim"])
        fields["rope_scaling"] = {"rope_type": "llama3", "factor": float(factor), **META_ROPE}
        fields.setdefault("max_seq_len", 131072)
    try:
        config = DecoderConfig(**fields)
        family = family_for(config, _meta_families())
        if "max_seq_len" not in fields and family == "llama3":
            config = dataclasses.replace(config, max_seq_len=8192)  # Llama 3.0
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from e
    return config, family


def meta_params_for(config: DecoderConfig) -> dict:
    """A params.json from which Meta's reference code (and :func:`config_from_meta`) builds
    this model: ``multiple_of`` / ``ffn_dim_multiplier`` chosen to give its FFN width.

    Raises:
        CheckpointError: If params.json cannot say the model's RoPE scaling (Meta's code fixes
            all but the factor).
    """
    params = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
              "n_kv_heads": config.n_kv_heads, "vocab_size": config.vocab_size,
              "multiple_of": config.multiple_of, "norm_eps": config.norm_eps,
              "rope_theta": config.rope_theta}
    if config.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = config.ffn_dim_multiplier
    if _ffn_width(params) != config.hidden_dim:
        params.pop("ffn_dim_multiplier", None)
        params.update(_ffn_params(config.dim, config.hidden_dim))
    if config.head_dim != config.dim // config.n_heads:
        params["head_dim"] = config.head_dim  # Mistral's name for it
    if config.sliding_window is not None:
        params["sliding_window"] = config.sliding_window
    if config.rope_scaling is not None:
        scaling = config.rope_scaling
        fixed = {k: scaling[k] for k in META_ROPE}
        if scaling["rope_type"] != "llama3" or fixed != META_ROPE:
            raise CheckpointError(
                f"Meta's params.json cannot hold rope_scaling {scaling}: Meta's code fixes "
                f"{', '.join(f'{k} {v:g}' for k, v in META_ROPE.items())}; convert --to hf "
                "instead"
            )
        params["use_scaled_rope"] = True
        if scaling["factor"] != _meta_factor(config.dim):
            params["rope_scaling_factor"] = scaling["factor"]
    return params


def _ffn_width(params: dict) -> int:
    return DecoderConfig(dim=params["dim"], n_heads=1, multiple_of=params["multiple_of"],
                         ffn_dim_multiplier=params.get("ffn_dim_multiplier")).hidden_dim


def _ffn_params(dim: int, hidden_dim: int) -> dict:
    # Meta's code derives the width from multiple_of (and ffn_dim_multiplier): find values
    # that land on this width, a plain power-of-two multiple_of if one does.
    for multiple in (2**p for p in range(12, -1, -1)):
        if _ffn_width({"dim": dim, "multiple_of": multiple}) == hidden_dim:
            return {"multiple_of": multiple}
    base = _ffn_width({"dim": dim, "multiple_of": 1})
    return {"multiple_of": 1, "ffn_dim_multiplier": (hidden_dim + 0.5) / base}
