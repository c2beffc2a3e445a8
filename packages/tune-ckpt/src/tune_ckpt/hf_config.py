"""Hugging Face ``config.json`` <-> :class:`tune_models.DecoderConfig`, for every family.

A model's shape is tune-models' ``DecoderConfig``; the families (their architecture names,
token ids, key templates) are ``tune_models.FAMILIES``. What is left for this module is what
each transformers *architecture* can express and how its config.json spells it:

* Llama (``LlamaForCausalLM``, Llama 2 and 3.x): ``rope_scaling`` of type llama3,
  ``tie_word_embeddings``, ``head_dim``; ``attention_bias`` would put a bias on o_proj too,
  which tune's decoder lacks, so it is refused.
* Mistral (``MistralForCausalLM``): ``sliding_window`` (None for v0.2 and later).
* Qwen2 (``Qwen2ForCausalLM``): q/k/v biases always (there is no flag for them),
  ``tie_word_embeddings``; ``use_sliding_window`` (a window on the upper layers only) is
  refused.

Both spellings transformers has used are read: ``rope_theta`` + ``rope_scaling`` (4.x and every
config on the Hub) and ``rope_parameters`` (5.x). The 4.x spelling is written, which every
version reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tune_ckpt.errors import CheckpointError
from tune_models import FAMILIES, DecoderConfig, ModelFamily
from tune_models.decoder import ROPE_SCALING_FIELDS


@dataclass(frozen=True)
class HfArchitecture:
    """What one transformers architecture can express.

    Attributes:
        qkv_bias: Its q/k/v projections have biases: always (True) or never (False).
        sliding_window: Its config.json's ``sliding_window`` applies to every layer.
        extra: config.json keys transformers writes for it that tune has no field for.
    """

    qkv_bias: bool
    sliding_window: bool
    extra: Callable[[DecoderConfig], dict]


# By model_type (a family's ``hf_model_type``). A family on an architecture not listed here
# needs an entry: the converter refuses its config.json until then.
ARCHITECTURES: dict[str, HfArchitecture] = {
    "llama": HfArchitecture(
        qkv_bias=False, sliding_window=False,
        extra=lambda c: {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1},
    ),
    "mistral": HfArchitecture(
        qkv_bias=False, sliding_window=True,
        extra=lambda c: {"sliding_window": c.sliding_window},
    ),
    "qwen2": HfArchitecture(
        qkv_bias=True, sliding_window=False,
        extra=lambda c: {"use_sliding_window": False, "sliding_window": None,
                         "max_window_layers": c.n_layers},
    ),
}


def _architecture(family: ModelFamily) -> HfArchitecture:
    if family.hf_model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"tune-ckpt has no config.json rules for {family.hf_architecture} (family "
            f"{family.name}): add an entry to tune_ckpt.hf_config.ARCHITECTURES"
        )
    return ARCHITECTURES[family.hf_model_type]


def can_express(family: ModelFamily, config: DecoderConfig) -> str | None:
    """Why ``family``'s HF architecture cannot hold ``config`` (None if it can)."""
    arch = _architecture(family)
    if config.qkv_bias != arch.qkv_bias:
        has = "has" if config.qkv_bias else "has no"
        needs = "always has them" if arch.qkv_bias else "has none"
        return f"the model {has} q/k/v biases and {family.hf_architecture} {needs}"
    if config.sliding_window is not None and not arch.sliding_window:
        return (f"the model has a sliding window ({config.sliding_window}) and "
                f"{family.hf_architecture} has none")
    return None


def _resembles(family: ModelFamily, config: DecoderConfig) -> bool:
    kind = (config.rope_scaling or {}).get("rope_type")
    for preset in family.presets.values():
        p = preset()
        if p.vocab_size == config.vocab_size:
            return True
        if kind is not None and p.rope_scaling and p.rope_scaling["rope_type"] == kind:
            return True
    return False


def family_for(config: DecoderConfig, candidates: list[ModelFamily] | None = None) -> str:
    """The family a model most likely belongs to, when nothing names it.

    Among the candidates (default: every family) whose HF architecture can hold the model,
    the first with a preset of the same vocabulary size or RoPE scaling type; else the first
    that can hold it. So a Llama with Llama 3's 128256-token vocabulary or its RoPE scaling
    is "llama3", q/k/v biases mean "qwen2" and a sliding window "mistral".

    Raises:
        CheckpointError: If no candidate can hold the model.
    """
    candidates = list(FAMILIES.values()) if candidates is None else candidates
    fitting = [f for f in candidates if can_express(f, config) is None]
    if not fitting:
        raise CheckpointError(f"no model family fits this model: "
                              f"{can_express(candidates[0], config)}")
    return next((f for f in fitting if _resembles(f, config)), fitting[0]).name


# --- reading ---------------------------------------------------------------------------------


def _families_of(config: dict, where: str) -> list[ModelFamily]:
    architectures = config.get("architectures") or []
    name = architectures[0] if architectures else None
    found = [f for f in FAMILIES.values()
             if (f.hf_architecture == name if name else f.hf_model_type == config.get(
                 "model_type"))]
    if not found:
        supported = ", ".join(dict.fromkeys(f.hf_architecture for f in FAMILIES.values()))
        what = f"architecture '{name}'" if name else \
            f"model_type '{config.get('model_type')}'"
        raise CheckpointError(
            f"{where}: {what} is not supported; tune converts {supported}"
        )
    return found


def _rope(config: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either spelling, scaling in DecoderConfig's names."""
    parameters = config.get("rope_parameters") or {}
    theta = config.get("rope_theta") or parameters.get("rope_theta") or 10000.0
    scaling = config.get("rope_scaling") or parameters
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    if "type" in scaling and "rope_type" not in scaling:  # the oldest spelling
        scaling["rope_type"] = scaling.pop("type")
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return theta, None
    if kind not in ROPE_SCALING_FIELDS:
        raise CheckpointError(
            f"{where}: rope_scaling type '{kind}' is not supported (tune implements "
            f"{', '.join(ROPE_SCALING_FIELDS)}); this model cannot be converted"
        )
    return theta, {"rope_type": kind,
                   **{name: scaling.get(name) for name in ROPE_SCALING_FIELDS[kind]}}


_FLOATS = ("rms_norm_eps", "rope_theta")
_POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
             "sliding_window", *_FLOATS)


def config_from_hf(config: dict, where: str = "config.json") -> tuple[DecoderConfig, str]:
    """A transformers config.json -> (the model's DecoderConfig, its family's name).

    Args:
        config: The parsed config.json.
        where: The file, for messages.

    Raises:
        CheckpointError: An architecture tune does not convert, a feature its decoder lacks
            (o_proj or MLP biases, Qwen2's per-layer sliding window, an unknown RoPE scaling
            type, an activation other than silu), or a missing or bad size.
    """
    candidates = _families_of(config, where)
    arch = _architecture(candidates[0])
    for flag, why in (("attention_bias", "a bias on o_proj too"), ("mlp_bias", "MLP biases"),
                      ("use_sliding_window", "a sliding window on some layers only")):
        if config.get(flag):
            raise CheckpointError(f"{where}: {flag} is true ({why}), which tune's decoder "
                                  "does not implement; this model cannot be converted")
    if "sliding_attention" in (config.get("layer_types") or []) and not arch.sliding_window:
        raise CheckpointError(f"{where}: layer_types has sliding_attention layers, which "
                              "tune's decoder does not implement")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act '{config['hidden_act']}' is not silu, the "
                              "only activation tune's decoder has")
    for name in _POSITIVE:
        value = config.get(name)
        kinds = (int, float) if name in _FLOATS else int
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)
                                  or value <= 0):
            kind = "number" if name in _FLOATS else "integer"
            raise CheckpointError(f"{where}: '{name}' must be a positive {kind}, got {value!r}")
    theta, scaling = _rope(config, where)
    try:
        fields = {
            "vocab_size": config["vocab_size"], "dim": config["hidden_size"],
            "n_layers": config["num_hidden_layers"], "n_heads": config["num_attention_heads"],
            "n_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
            "hidden_dim": config["intermediate_size"],
            "head_dim": config.get("head_dim"),
            "norm_eps": config.get("rms_norm_eps", 1e-6),
            "rope_theta": float(theta),
            "rope_scaling": scaling,
            "qkv_bias": arch.qkv_bias,
            "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
            "sliding_window": config.get("sliding_window") if arch.sliding_window else None,
        }
    except KeyError as e:
        raise CheckpointError(f"{where}: missing '{e.args[0]}'") from e
    if config.get("max_position_embeddings"):
        fields["max_seq_len"] = config["max_position_embeddings"]
    try:
        model = DecoderConfig(**fields)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from e
    return model, family_for(model, candidates)


# --- writing ---------------------------------------------------------------------------------


def hf_config_for(config: DecoderConfig, family: str, dtype_name: str) -> dict:
    """The config.json transformers writes for this model of this family.

    Args:
        config: The model.
        family: Its family's name (a key of ``tune_models.FAMILIES``).
        dtype_name: The weights' dtype as config.json spells it ("bfloat16").

    Raises:
        CheckpointError: If the family's architecture cannot hold the model.
    """
    entry = FAMILIES[family]
    problem = can_express(entry, config)
    if problem:
        raise CheckpointError(f"cannot write a {family} ({entry.hf_architecture}) config.json: "
                              f"{problem}; is the family in tune_model.json right?")
    return {
        "architectures": [entry.hf_architecture],
        "model_type": entry.hf_model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        **_architecture(entry).extra(config),
        **entry.hf_token_ids,
        "torch_dtype": dtype_name,
    }


def generation_config_for(family: str) -> dict:
    """The generation_config.json transformers writes beside a model of this family."""
    return dict(FAMILIES[family].hf_token_ids)
