"""Hugging Face ``config.json`` <-> :class:`tune_models.DecoderConfig`, for every family.

A model's shape is tune-models' ``DecoderConfig``; the families (their architecture names,
token ids, key templates) are ``tune_models.FAMILIES``. What is left for this module is what
each transformers *architecture* can express and how its config.json spells it:

* Llama (``LlamaForCausalLM``, Llama 2 and 3.x): ``rope_scaling`` of type llama3 or linear,
  ``tie_word_embeddings``, ``head_dim``; ``attention_bias`` would put a bias on o_proj too,
  which tune's decoder lacks, so it is refused.
* Mistral (``MistralForCausalLM``): ``sliding_window`` (None for v0.2 and later).
* Qwen2 (``Qwen2ForCausalLM``): q/k/v biases always (there is no flag for them),
  ``tie_word_embeddings``; ``use_sliding_window`` (a window on the upper layers only) is
  refused. Qwen3 (``Qwen3ForCausalLM``): the same less the biases, plus QK-norm always.
* Gemma 3 (``Gemma3ForCausalLM``, model_type ``gemma3_text``): QK-norm, (1 + w) norms before
  and after attention and the MLP, GELU-tanh, embeddings times sqrt(dim), always; and from
  config.json the window, the local/global ``layer_types`` (or 4.x's
  ``sliding_window_pattern``), both RoPE bases, ``query_pre_attn_scalar`` and
  ``final_logit_softcapping``. A key config.json leaves out takes transformers' default for
  the class (the multimodal checkpoints' ``text_config`` lists only what differs).
* Multimodal wrappers (``Gemma3ForConditionalGeneration``): the text decoder is converted,
  from ``text_config`` and the language model's tensors; the vision tower is left out.

Both spellings transformers has used are read: ``rope_theta`` + ``rope_scaling`` (4.x and every
config on the Hub) and ``rope_parameters`` (5.x, per layer type for Gemma 3). The 4.x spelling
is written, which every version reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tune_ckpt.errors import CheckpointError
from tune_models import FAMILIES, DecoderConfig, ModelFamily, uses_sliding_window
from tune_models.decoder import ROPE_SCALING_FIELDS

# The DecoderConfig fields that set one architecture apart from another: each architecture
# fixes some (Qwen2 always has q/k/v biases), lets config.json set some (Mistral's window)
# and cannot express the rest, which must keep their plain (Llama) values, the defaults.
FEATURES = ("qkv_bias", "qk_norm", "norm_unit_offset", "post_norms", "activation",
            "scale_embeddings", "sliding_window", "sliding_window_pattern", "rope_local_theta",
            "query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap")
PLAIN = {f.name: f.default for f in dataclasses.fields(DecoderConfig) if f.name in FEATURES}
_WORDS = {"qkv_bias": "q/k/v biases", "qk_norm": "QK-norm",
          "norm_unit_offset": "(1 + weight) RMSNorm gains",
          "post_norms": "norms after attention and the feed-forward",
          "scale_embeddings": "embeddings scaled by sqrt(dim)",
          "sliding_window": "a sliding window", "sliding_window_pattern": "local and global layers",
          "rope_local_theta": "a RoPE base of its own for local layers",
          "query_pre_attn_scalar": "a query scale of its own",
          "attn_logit_softcap": "soft-capped attention scores",
          "final_logit_softcap": "soft-capped logits", "activation": "an activation"}
# DecoderConfig.activation -> transformers' name of it.
HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}


@dataclass(frozen=True)
class HfArchitecture:
    """What one transformers architecture can express.

    Attributes:
        fixed: Feature fields (:data:`FEATURES`) whose value every model of it has, where that
            is not the plain one.
        free: Feature fields its config.json sets (read by :func:`config_from_hf`).
        extra: config.json keys transformers writes for it beyond the common ones.
        defaults: What transformers assumes for a config.json key that is absent (the
            config class's defaults), where that is not tune's.
        activation_key: The config.json key naming the activation.
    """

    extra: Callable[[DecoderConfig], dict]
    fixed: dict[str, Any] = field(default_factory=dict)
    free: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)
    activation_key: str = "hidden_act"

    def value(self, name: str) -> Any:
        """The value a fixed or inexpressible feature has in every model of it."""
        return self.fixed.get(name, PLAIN[name])


def _layer_types(config: DecoderConfig) -> list[str]:
    return ["sliding_attention" if uses_sliding_window(config, i) else "full_attention"
            for i in range(config.n_layers)]


def _gemma3_extra(c: DecoderConfig) -> dict:
    return {
        "query_pre_attn_scalar": c.query_pre_attn_scalar or c.head_dim,
        "sliding_window": c.sliding_window,
        # 4.x reads the pattern, 5.x the list; both say the same.
        **({"sliding_window_pattern": c.sliding_window_pattern}
           if c.sliding_window_pattern else {}),
        "layer_types": _layer_types(c),
        "rope_local_base_freq": c.rope_local_theta or c.rope_theta,
        "final_logit_softcapping": c.final_logit_softcap,
        "attn_logit_softcapping": None,
        "attention_bias": False,
        "pad_token_id": 0,
    }


# By model_type (a family's ``hf_model_type``). A family on an architecture not listed here
# needs an entry: the converter refuses its config.json until then.
ARCHITECTURES: dict[str, HfArchitecture] = {
    "llama": HfArchitecture(
        extra=lambda c: {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1},
    ),
    "mistral": HfArchitecture(
        free=("sliding_window",),
        extra=lambda c: {"sliding_window": c.sliding_window},
    ),
    "qwen2": HfArchitecture(
        fixed={"qkv_bias": True},
        extra=lambda c: {"use_sliding_window": False, "sliding_window": None,
                         "max_window_layers": c.n_layers},
    ),
    "qwen3": HfArchitecture(
        fixed={"qk_norm": True},
        extra=lambda c: {"attention_bias": False, "use_sliding_window": False,
                         "sliding_window": None, "max_window_layers": c.n_layers},
    ),
    "gemma3_text": HfArchitecture(
        fixed={"qk_norm": True, "norm_unit_offset": True, "post_norms": True,
               "activation": "gelu_tanh", "scale_embeddings": True},
        free=("sliding_window", "sliding_window_pattern", "rope_local_theta",
              "query_pre_attn_scalar", "final_logit_softcap"),
        # Gemma3TextConfig's defaults (transformers 4.50 to 5.x).
        defaults={"vocab_size": 262208, "num_attention_heads": 8, "num_key_value_heads": 4,
                  "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
                  "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
                  "tie_word_embeddings": True, "query_pre_attn_scalar": 256,
                  "sliding_window": 4096, "sliding_window_pattern": 6,
                  "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0},
        activation_key="hidden_activation",
        extra=_gemma3_extra,
    ),
}


@dataclass(frozen=True)
class HfMultimodal:
    """A transformers architecture that wraps a text decoder tune converts with a vision
    tower it does not.

    Attributes:
        text_architecture: The text decoder's architecture (a family's ``hf_architecture``).
        text_prefixes: Prefix of the language model's keys -> the text model's prefix, for
            every layout transformers has written (4.x and the Hub: ``language_model.model.``;
            5.x in memory: ``model.language_model.``).
        other_prefixes: Prefixes of the keys that are left out (the vision tower and the
            projector into the text model's embedding).
    """

    text_architecture: str
    text_prefixes: dict[str, str]
    other_prefixes: tuple[str, ...]

    def text_keys(self, keys: list[str]) -> tuple[dict[str, str], int]:
        """(the text model's name -> the key, for every key of the language model; the
        number of keys left out). Keys of neither part keep their names, so that checking
        the text model's keys names them."""
        names, left_out = {}, 0
        for key in keys:
            prefix = next((p for p in self.text_prefixes if key.startswith(p)), None)
            if prefix is not None:
                names[self.text_prefixes[prefix] + key[len(prefix):]] = key
            elif key.startswith(self.other_prefixes):
                left_out += 1
            else:
                names[key] = key
        return names, left_out


MULTIMODAL: dict[str, HfMultimodal] = {
    "Gemma3ForConditionalGeneration": HfMultimodal(
        text_architecture="Gemma3ForCausalLM",
        text_prefixes={"language_model.model.": "model.", "model.language_model.": "model.",
                       "language_model.lm_head.": "lm_head."},
        other_prefixes=("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                        "model.multi_modal_projector."),
    ),
}


def multimodal_of(config: dict) -> HfMultimodal | None:
    """The multimodal wrapper a config.json describes, or None for a text model."""
    architectures = config.get("architectures") or []
    return MULTIMODAL.get(architectures[0]) if architectures else None


def text_config(config: dict) -> dict:
    """A config.json's text model: itself, or a multimodal config's ``text_config`` named as
    the text decoder's own config.json would be."""
    wrapper = multimodal_of(config)
    if wrapper is None:
        return config
    text = dict(config.get("text_config") or {})
    if "tie_word_embeddings" not in text and "tie_word_embeddings" in config:
        text["tie_word_embeddings"] = config["tie_word_embeddings"]
    return {**text, "architectures": [wrapper.text_architecture]}


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
    name = family.hf_architecture
    for feature in FEATURES:
        if feature in arch.free:
            continue
        value, needed = getattr(config, feature), arch.value(feature)
        if value == needed:
            continue
        if feature == "activation":
            return f"the model's activation is {value} and {name}'s is {needed}"
        words = _WORDS[feature]
        if needed is True:
            return f"the model has no {words}, which every {name} has"
        shown = "" if value is True else f" ({value})"
        return f"the model has {words}{shown} and {name} has none"
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
    is "llama3", q/k/v biases mean "qwen2", QK-norm alone "qwen3", Gemma's layers "gemma3"
    and a sliding window on every layer "mistral".

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
        supported = ", ".join([*dict.fromkeys(f.hf_architecture for f in FAMILIES.values()),
                               *(f"{n} (its text decoder)" for n in MULTIMODAL)])
        what = f"architecture '{name}'" if name else \
            f"model_type '{config.get('model_type')}'"
        raise CheckpointError(
            f"{where}: {what} is not supported; tune converts {supported}"
        )
    return found


def _one_rope(parameters: dict, theta: float | None, where: str,
              what: str = "rope_scaling") -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling in DecoderConfig's names) from one RoPE description."""
    theta = parameters.get("rope_theta") or theta or 10000.0
    scaling = {k: v for k, v in parameters.items() if k != "rope_theta"}
    if "type" in scaling and "rope_type" not in scaling:  # the oldest spelling
        scaling["rope_type"] = scaling.pop("type")
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return theta, None
    if kind not in ROPE_SCALING_FIELDS:
        raise CheckpointError(
            f"{where}: {what} type '{kind}' is not supported (tune implements "
            f"{', '.join(ROPE_SCALING_FIELDS)}); this model cannot be converted"
        )
    return theta, {"rope_type": kind,
                   **{name: scaling.get(name) for name in ROPE_SCALING_FIELDS[kind]}}


def _rope(config: dict, where: str) -> tuple[float, dict | None, float | None]:
    """(rope_theta, rope_scaling, the local layers' base or None) from any spelling."""
    parameters = config.get("rope_parameters") or {}
    if "full_attention" in parameters or "sliding_attention" in parameters:
        # 5.x, one description per layer type (Gemma 3).
        theta, scaling = _one_rope(parameters.get("full_attention") or {}, None, where,
                                   "rope_parameters['full_attention']")
        local = parameters.get("sliding_attention")
        if local is None:
            return theta, scaling, None
        local_theta, local_scaling = _one_rope(local, None, where)
        if local_scaling is not None:
            raise CheckpointError(
                f"{where}: the sliding_attention layers' RoPE has type "
                f"'{local_scaling['rope_type']}'; tune scales the global layers' RoPE only"
            )
        return theta, scaling, local_theta
    theta, scaling = _one_rope(config.get("rope_scaling") or parameters,
                               config.get("rope_theta"), where)
    return theta, scaling, config.get("rope_local_base_freq")


def _window(config: dict, n_layers: int, where: str) -> tuple[int | None, int | None]:
    """(sliding_window, sliding_window_pattern) from ``layer_types`` (5.x) or
    ``sliding_window_pattern`` (Gemma's 4.x configs); (None, None) without local layers."""
    window = config.get("sliding_window")
    layer_types = config.get("layer_types")
    if layer_types is None:
        return window, config.get("sliding_window_pattern") if window else None
    if not isinstance(layer_types, list) or len(layer_types) != n_layers:
        size = len(layer_types) if isinstance(layer_types, list) else "no"
        raise CheckpointError(f"{where}: layer_types lists {size} layers and "
                              f"num_hidden_layers is {n_layers}")
    kinds = set(layer_types)
    if "sliding_attention" not in kinds or window is None:
        return None, None
    if kinds == {"sliding_attention"}:
        return window, None
    pattern = layer_types.index("full_attention") + 1 if "full_attention" in kinds else 0
    expected = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                for i in range(n_layers)] if pattern >= 2 else None
    if list(layer_types) != expected or not kinds <= {"sliding_attention", "full_attention"}:
        raise CheckpointError(
            f"{where}: layer_types is not n-1 sliding_attention layers then one "
            "full_attention layer, repeated: the only mix tune's decoder implements"
        )
    return window, pattern


_FLOATS = ("rms_norm_eps", "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar",
           "final_logit_softcapping")
_POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
             "sliding_window", "sliding_window_pattern", *_FLOATS)


def config_from_hf(config: dict, where: str = "config.json") -> tuple[DecoderConfig, str]:
    """A transformers config.json -> (the model's DecoderConfig, its family's name).

    A multimodal config.json (Gemma 3 4B and up) gives its text decoder.

    Args:
        config: The parsed config.json.
        where: The file, for messages.

    Raises:
        CheckpointError: An architecture tune does not convert, a feature its decoder lacks
            (o_proj or MLP biases, Qwen2's per-layer sliding window, an unknown RoPE scaling
            type, another activation), or a missing or bad size.
    """
    config = text_config(config)
    candidates = _families_of(config, where)
    arch = _architecture(candidates[0])
    config = {**arch.defaults, **config}
    for flag, why in (("attention_bias", "a bias on o_proj too"), ("mlp_bias", "MLP biases"),
                      ("use_sliding_window", "a sliding window on some layers only"),
                      ("use_bidirectional_attention", "attention to later tokens too")):
        if config.get(flag):
            raise CheckpointError(f"{where}: {flag} is true ({why}), which tune's decoder "
                                  "does not implement; this model cannot be converted")
    if "sliding_attention" in (config.get("layer_types") or []) and \
            "sliding_window" not in arch.free:
        raise CheckpointError(f"{where}: layer_types has sliding_attention layers, which "
                              "tune's decoder does not implement")
    key, activation = arch.activation_key, HF_ACTIVATIONS[arch.value("activation")]
    if config.get(key, "silu") != activation:
        raise CheckpointError(f"{where}: {key} '{config[key]}' is not {activation}, the only "
                              f"activation tune's decoder has for {candidates[0].hf_architecture}")
    for name in _POSITIVE:
        value = config.get(name)
        kinds = (int, float) if name in _FLOATS else int
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)
                                  or value <= 0):
            kind = "number" if name in _FLOATS else "integer"
            raise CheckpointError(f"{where}: '{name}' must be a positive {kind}, got {value!r}")
    theta, scaling, local_theta = _rope(config, where)
    try:
        n_layers = config["num_hidden_layers"]
        window, pattern = _window(config, n_layers, where)
        fields = {
            "vocab_size": config["vocab_size"], "dim": config["hidden_size"],
            "n_layers": n_layers, "n_heads": config["num_attention_heads"],
            "n_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
            "hidden_dim": config["intermediate_size"],
            "head_dim": config.get("head_dim"),
            "norm_eps": config.get("rms_norm_eps", 1e-6),
            "rope_theta": float(theta),
            "rope_scaling": scaling,
            "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
            **{name: arch.value(name) for name in FEATURES},
        }
    except KeyError as e:
        raise CheckpointError(f"{where}: missing '{e.args[0]}'") from e
    read = {"sliding_window": window, "sliding_window_pattern": pattern,
            "rope_local_theta": float(local_theta) if window and local_theta else None,
            "query_pre_attn_scalar": config.get("query_pre_attn_scalar"),
            "final_logit_softcap": config.get("final_logit_softcapping")}
    fields.update({name: read[name] for name in arch.free})
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
    arch = _architecture(entry)
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
        arch.activation_key: HF_ACTIVATIONS[config.activation],
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        **arch.extra(config),
        **entry.hf_token_ids,
        "torch_dtype": dtype_name,
    }


def generation_config_for(family: str) -> dict:
    """The generation_config.json transformers writes beside a model of this family."""
    return dict(FAMILIES[family].hf_token_ids)
