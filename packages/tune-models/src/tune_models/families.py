"""Model families: the presets of each, and what else tune needs to know about it (torch only).

One :class:`ModelFamily` entry per family bundles its config presets, the tokenizer kind and
default chat template the data layer maps to its own classes, the Hugging Face architecture
names the converter reads and writes, and the checkpoint key maps. Recipes, the converter and
the CLI look a family up here instead of naming a model class; adding a family means adding
its presets and one entry to :data:`FAMILIES`.

Every family is the one :class:`~tune_models.decoder.Decoder`; presets differ only in
:class:`~tune_models.decoder.DecoderConfig` fields. Parameter counts in the docstrings are the
published ones, checked on the meta device by the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tune_models.decoder import DecoderConfig

# --- Llama 2 ---------------------------------------------------------------------------------


def llama2_7b() -> DecoderConfig:
    """Llama-2-7B: 6,738,415,616 parameters."""
    return DecoderConfig(dim=4096, n_layers=32, n_heads=32)


def llama2_13b() -> DecoderConfig:
    """Llama-2-13B: 13,015,864,320 parameters."""
    return DecoderConfig(dim=5120, n_layers=40, n_heads=40)


def llama2_70b() -> DecoderConfig:
    """Llama-2-70B (grouped-query attention, 8 KV heads): 68,976,648,192 parameters."""
    return DecoderConfig(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096
    )


def llama2_tiny(vocab_size: int = 32000) -> DecoderConfig:
    """A ~1M-parameter (plus embeddings) Llama 2 for tests and demos; grouped-query like 70B."""
    return DecoderConfig(
        vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
        max_seq_len=512,
    )


def llama2_20m(vocab_size: int = 32000) -> DecoderConfig:
    """A ~20M-parameter Llama 2 (most of it embeddings at vocab 32000), the CPU benchmark size."""
    return DecoderConfig(
        vocab_size=vocab_size, dim=256, n_layers=4, n_heads=8, multiple_of=64, max_seq_len=1024
    )


# --- Llama 3.1 and 3.2 -----------------------------------------------------------------------


# Llama 3.1 and 3.2 were trained at 8192 positions and stretched to 131072 by this scaling;
# Meta's reference code fixes these fields (only the factor varies between models).
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def _llama3_rope(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, **LLAMA3_ROPE}


def _llama3(**sizes) -> DecoderConfig:
    return DecoderConfig(
        vocab_size=128256, n_kv_heads=8, norm_eps=1e-5, max_seq_len=131072, rope_theta=500000.0,
        **sizes,
    )


def llama3_1_8b() -> DecoderConfig:
    """Llama-3.1-8B: 8,030,261,248 parameters."""
    return _llama3(dim=4096, n_layers=32, n_heads=32, hidden_dim=14336,
                   rope_scaling=_llama3_rope(8.0))


def llama3_1_70b() -> DecoderConfig:
    """Llama-3.1-70B: 70,553,706,496 parameters."""
    return _llama3(dim=8192, n_layers=80, n_heads=64, hidden_dim=28672,
                   rope_scaling=_llama3_rope(8.0))


def llama3_2_1b() -> DecoderConfig:
    """Llama-3.2-1B (tied embeddings): 1,235,814,400 parameters."""
    return _llama3(dim=2048, n_layers=16, n_heads=32, hidden_dim=8192, tie_embeddings=True,
                   rope_scaling=_llama3_rope(32.0))


def llama3_2_3b() -> DecoderConfig:
    """Llama-3.2-3B (tied embeddings): 3,212,749,824 parameters."""
    return _llama3(dim=3072, n_layers=28, n_heads=24, hidden_dim=8192, tie_embeddings=True,
                   rope_scaling=_llama3_rope(32.0))


def llama3_tiny(vocab_size: int = 128256) -> DecoderConfig:
    """A tiny Llama 3.2 for tests and demos: tied embeddings, and a RoPE scaling (original
    context 48) under which its 8 frequency pairs fall in all three bands: kept, blended and
    slowed down."""
    return DecoderConfig(
        vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160,
        max_seq_len=512, rope_theta=500000.0, tie_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 48},
    )


# --- Mistral ---------------------------------------------------------------------------------


def mistral_7b() -> DecoderConfig:
    """Mistral-7B-v0.1 (sliding-window attention over 4096 positions): 7,241,732,096 parameters."""
    return DecoderConfig(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
        norm_eps=1e-5, max_seq_len=32768, rope_theta=10000.0, sliding_window=4096,
    )


def mistral_tiny(vocab_size: int = 32000) -> DecoderConfig:
    """A tiny Mistral for tests and demos; its 16-position window matters at short lengths."""
    return DecoderConfig(
        vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160,
        max_seq_len=512, sliding_window=16,
    )


# --- Qwen2.5 ---------------------------------------------------------------------------------


def _qwen2(**sizes) -> DecoderConfig:
    return DecoderConfig(norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True, **sizes)


def qwen2_5_0_5b() -> DecoderConfig:
    """Qwen2.5-0.5B (tied embeddings): 494,032,768 parameters."""
    return _qwen2(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2,
                  hidden_dim=4864, max_seq_len=32768, tie_embeddings=True)


def qwen2_5_1_5b() -> DecoderConfig:
    """Qwen2.5-1.5B (tied embeddings): 1,543,714,304 parameters."""
    return _qwen2(vocab_size=151936, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2,
                  hidden_dim=8960, max_seq_len=32768, tie_embeddings=True)


def qwen2_5_7b() -> DecoderConfig:
    """Qwen2.5-7B: 7,615,616,512 parameters."""
    return _qwen2(vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                  hidden_dim=18944, max_seq_len=131072)


def qwen2_tiny(vocab_size: int = 151936) -> DecoderConfig:
    """A tiny Qwen2.5 for tests and demos: q/k/v biases and tied embeddings."""
    return _qwen2(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  hidden_dim=160, max_seq_len=512, tie_embeddings=True)


# --- Qwen3 -----------------------------------------------------------------------------------


def _qwen3(**sizes) -> DecoderConfig:
    # Qwen2.5 less the q/k/v biases, plus QK-norm; every size has 128-wide heads.
    fields = dict(vocab_size=151936, head_dim=128, n_kv_heads=8, norm_eps=1e-6,
                  max_seq_len=40960, rope_theta=1000000.0, qk_norm=True)
    return DecoderConfig(**{**fields, **sizes})


def qwen3_0_6b() -> DecoderConfig:
    """Qwen3-0.6B (tied embeddings): 596,049,920 parameters."""
    return _qwen3(dim=1024, n_layers=28, n_heads=16, hidden_dim=3072, tie_embeddings=True)


def qwen3_1_7b() -> DecoderConfig:
    """Qwen3-1.7B (tied embeddings): 1,720,574,976 parameters."""
    return _qwen3(dim=2048, n_layers=28, n_heads=16, hidden_dim=6144, tie_embeddings=True)


def qwen3_4b() -> DecoderConfig:
    """Qwen3-4B (tied embeddings): 4,022,468,096 parameters."""
    return _qwen3(dim=2560, n_layers=36, n_heads=32, hidden_dim=9728, tie_embeddings=True)


def qwen3_8b() -> DecoderConfig:
    """Qwen3-8B: 8,190,735,360 parameters."""
    return _qwen3(dim=4096, n_layers=36, n_heads=32, hidden_dim=12288)


def qwen3_14b() -> DecoderConfig:
    """Qwen3-14B: 14,768,307,200 parameters."""
    return _qwen3(dim=5120, n_layers=40, n_heads=40, hidden_dim=17408)


def qwen3_32b() -> DecoderConfig:
    """Qwen3-32B: 32,762,123,264 parameters."""
    return _qwen3(dim=5120, n_layers=64, n_heads=64, hidden_dim=25600)


def qwen3_tiny(vocab_size: int = 151936) -> DecoderConfig:
    """A tiny Qwen3 for tests and demos: QK-norm, heads wider than dim / n_heads, tied."""
    return _qwen3(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=32, hidden_dim=160, max_seq_len=512, tie_embeddings=True)


# --- Gemma 3 ---------------------------------------------------------------------------------


def _gemma3(**sizes) -> DecoderConfig:
    # Five sliding-window layers (RoPE base 10k) to one global layer (base 1M), GeGLU, QK-norm,
    # (1 + w) norms before and after attention and the feed-forward, embeddings times
    # sqrt(dim), tied. The text decoder of the multimodal 4B-27B checkpoints has 64 more
    # token ids (262,208: image tokens) than the 1B's 262,144.
    fields = dict(vocab_size=262208, head_dim=256, norm_eps=1e-6, max_seq_len=131072,
                  rope_theta=1000000.0, rope_local_theta=10000.0, sliding_window=1024,
                  sliding_window_pattern=6, qk_norm=True, norm_unit_offset=True,
                  post_norms=True, activation="gelu_tanh", scale_embeddings=True,
                  query_pre_attn_scalar=256, tie_embeddings=True,
                  rope_scaling={"rope_type": "linear", "factor": 8.0})
    return DecoderConfig(**{**fields, **sizes})


def gemma3_1b() -> DecoderConfig:
    """Gemma-3-1B (text only, 32k context, unscaled RoPE): 999,885,952 parameters."""
    return _gemma3(vocab_size=262144, dim=1152, n_layers=26, n_heads=4, n_kv_heads=1,
                   hidden_dim=6912, max_seq_len=32768, sliding_window=512, rope_scaling=None)


def gemma3_4b() -> DecoderConfig:
    """Gemma-3-4B's text decoder: 3,880,263,168 parameters."""
    return _gemma3(dim=2560, n_layers=34, n_heads=8, n_kv_heads=4, hidden_dim=10240)


def gemma3_12b() -> DecoderConfig:
    """Gemma-3-12B's text decoder: 11,766,034,176 parameters."""
    return _gemma3(dim=3840, n_layers=48, n_heads=16, n_kv_heads=8, hidden_dim=15360)


def gemma3_27b() -> DecoderConfig:
    """Gemma-3-27B's text decoder (128-wide heads, query scale 1/sqrt(168)): 27,009,346,304
    parameters."""
    return _gemma3(dim=5376, n_layers=62, n_heads=32, n_kv_heads=16, head_dim=128,
                   hidden_dim=21504, query_pre_attn_scalar=168)


def gemma3_tiny(vocab_size: int = 262144) -> DecoderConfig:
    """A tiny Gemma 3 for tests and demos: six layers (five local with an 8-position window,
    one global), both RoPE bases, the global one linearly scaled, and every Gemma detail."""
    return _gemma3(vocab_size=vocab_size, dim=64, n_layers=6, n_heads=4, n_kv_heads=2,
                   head_dim=32, hidden_dim=128, max_seq_len=512, sliding_window=8,
                   query_pre_attn_scalar=24)


# --- checkpoint key maps ---------------------------------------------------------------------

# Native key -> the key(s) it is made of in another layout, as templates over the layer index
# {i}. A tuple means the native tensor is the row-wise concatenation of those tensors, in order
# ([Q heads | K heads | V heads]). In the HF layout the q and k rows (and bias entries) of each
# head are in rotate-half order and must be permuted (see the README's RoPE convention); Meta's
# are as they are. checkpoint_key_map drops what a given model lacks (biases without qkv_bias,
# output.weight with tied embeddings).
HF_KEYS: dict[str, str | tuple[str, ...]] = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attention.wqkv.weight": ("model.layers.{i}.self_attn.q_proj.weight",
                                         "model.layers.{i}.self_attn.k_proj.weight",
                                         "model.layers.{i}.self_attn.v_proj.weight"),
    "layers.{i}.attention.wqkv.bias": ("model.layers.{i}.self_attn.q_proj.bias",
                                       "model.layers.{i}.self_attn.k_proj.bias",
                                       "model.layers.{i}.self_attn.v_proj.bias"),
    "layers.{i}.attention.q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "layers.{i}.attention.k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Gemma 2 and 3 name four norms per layer, and "post_attention" is the norm on attention's
# output (native attention_post_norm), not the one before the feed-forward as in Llama.
GEMMA_HF_KEYS: dict[str, str | tuple[str, ...]] = {
    **HF_KEYS,
    "layers.{i}.attention_post_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "layers.{i}.ffn_post_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}

# Native key templates whose rows are the dimensions of ONE head, in the native RoPE order:
# the QK-norm gains act on q and k before RoPE, so a layout that stores q/k rows in
# rotate-half order (HF) stores these in that order too, and they are permuted as a head is.
HEAD_ROW_KEYS = ("layers.{i}.attention.q_norm.weight", "layers.{i}.attention.k_norm.weight")

# Meta's consolidated.*.pth (Llama 2 and 3; Mistral's consolidated files use the same names).
META_KEYS: dict[str, str | tuple[str, ...]] = {
    "tok_embeddings.weight": "tok_embeddings.weight",
    "layers.{i}.attention_norm.weight": "layers.{i}.attention_norm.weight",
    "layers.{i}.attention.wqkv.weight": ("layers.{i}.attention.wq.weight",
                                         "layers.{i}.attention.wk.weight",
                                         "layers.{i}.attention.wv.weight"),
    "layers.{i}.attention.wo.weight": "layers.{i}.attention.wo.weight",
    "layers.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "layers.{i}.feed_forward.w1.weight": "layers.{i}.feed_forward.w1.weight",
    "layers.{i}.feed_forward.w2.weight": "layers.{i}.feed_forward.w2.weight",
    "layers.{i}.feed_forward.w3.weight": "layers.{i}.feed_forward.w3.weight",
    "norm.weight": "norm.weight",
    "output.weight": "output.weight",
}


def native_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Every key of ``Decoder(config).state_dict()`` with its shape, in that order.

    The native key schema as data (tested against the module for every preset), for code that
    must know a checkpoint's tensors without building a model: tune-ckpt checks and plans a
    conversion from it. Building even a meta-device model costs about a second of imports.

    Args:
        config: The model's shape.

    Returns:
        Native key -> shape.
    """
    d, f, v = config.dim, config.hidden_dim, config.vocab_size
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    out: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (v, d)}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        out[p + "attention_norm.weight"] = (d,)
        out[p + "attention.wqkv.weight"] = (q + 2 * kv, d)
        if config.qkv_bias:
            out[p + "attention.wqkv.bias"] = (q + 2 * kv,)
        if config.qk_norm:
            out[p + "attention.q_norm.weight"] = (config.head_dim,)
            out[p + "attention.k_norm.weight"] = (config.head_dim,)
        out[p + "attention.wo.weight"] = (d, q)
        if config.post_norms:
            out[p + "attention_post_norm.weight"] = (d,)
        out[p + "ffn_norm.weight"] = (d,)
        out[p + "feed_forward.w1.weight"] = (f, d)
        out[p + "feed_forward.w2.weight"] = (d, f)
        out[p + "feed_forward.w3.weight"] = (f, d)
        if config.post_norms:
            out[p + "ffn_post_norm.weight"] = (d,)
    out["norm.weight"] = (d,)
    if not config.tie_embeddings:
        out["output.weight"] = (v, d)
    return out


def qkv_rows(config: DecoderConfig) -> tuple[int, int, int]:
    """Rows of the q, k and v parts of the fused ``wqkv`` (weight and bias), in that order."""
    kv = config.n_kv_heads * config.head_dim
    return config.n_heads * config.head_dim, kv, kv


def checkpoint_key_map(
    config: DecoderConfig, templates: dict[str, str | tuple[str, ...]]
) -> dict[str, tuple[str, ...]]:
    """Every native key of a model of this shape -> the key(s) it is made of in a layout.

    Args:
        config: The model's shape.
        templates: A layout's key templates, e.g. :data:`HF_KEYS` or a family's
            ``checkpoint_keys["hf"]``.

    Returns:
        Native key -> source keys (one, or three to concatenate as [Q | K | V], whose rows
        :func:`qkv_rows` gives), in ``Decoder.state_dict()`` order.

    Raises:
        ValueError: If the model has a parameter the layout has no name for (a q/k/v bias in
            Meta's layout).
    """
    out = {}
    for key in native_shapes(config):
        layer, template_key = None, key
        if key.startswith("layers."):
            _, layer, rest = key.split(".", 2)
            template_key = "layers.{i}." + rest
        if template_key not in templates:
            raise ValueError(f"this checkpoint layout has no name for '{key}'")
        source = templates[template_key]
        names = (source,) if isinstance(source, str) else source
        out[key] = tuple(name.format(i=layer) for name in names)
    return out


# --- the registry ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFamily:
    """Everything tune knows about one model family.

    Attributes:
        name: The family's name, e.g. "llama3".
        presets: Preset name -> a function returning its config.
        tokenizer: Tokenizer kind, in tune_data's vocabulary (``tune_data.TOKENIZER_KINDS``,
            which names the class that reads it): "sentencepiece" (tokenizer.model),
            "tiktoken" (Meta's tokenizer.model for Llama 3) or "hf" (tokenizer.json). A
            family's models also read a tokenizer.json, which the Hub has for every family.
        chat_template: Name of the default chat template: "llama2", "llama3", "mistral",
            "chatml", "gemma" (the fallback when the model ships no template of its own).
        hf_architecture: ``architectures[0]`` of the family's Hugging Face config.json.
        hf_model_type: ``model_type`` of that config.json.
        checkpoint_keys: Layout ("hf", "meta") -> key templates (see
            :func:`checkpoint_key_map`); only the layouts the family is published in.
        hf_token_ids: ``bos_token_id`` and ``eos_token_id`` of the family's base models'
            config.json and generation_config.json (the converter's HF export writes them).
    """

    name: str
    presets: dict[str, Callable[[], DecoderConfig]]
    tokenizer: str
    chat_template: str
    hf_architecture: str
    hf_model_type: str
    checkpoint_keys: dict[str, dict[str, str | tuple[str, ...]]]
    hf_token_ids: dict[str, int] = field(default_factory=dict)


FAMILIES: dict[str, ModelFamily] = {
    "llama2": ModelFamily(
        name="llama2",
        presets={"llama2_7b": llama2_7b, "llama2_13b": llama2_13b, "llama2_70b": llama2_70b,
                 "llama2_20m": llama2_20m, "llama2_tiny": llama2_tiny},
        tokenizer="sentencepiece", chat_template="llama2",
        hf_architecture="LlamaForCausalLM", hf_model_type="llama",
        checkpoint_keys={"meta": META_KEYS, "hf": HF_KEYS},
        hf_token_ids={"bos_token_id": 1, "eos_token_id": 2},
    ),
    "llama3": ModelFamily(
        name="llama3",
        presets={"llama3_1_8b": llama3_1_8b, "llama3_1_70b": llama3_1_70b,
                 "llama3_2_1b": llama3_2_1b, "llama3_2_3b": llama3_2_3b,
                 "llama3_tiny": llama3_tiny},
        tokenizer="tiktoken", chat_template="llama3",
        hf_architecture="LlamaForCausalLM", hf_model_type="llama",
        checkpoint_keys={"meta": META_KEYS, "hf": HF_KEYS},
        hf_token_ids={"bos_token_id": 128000, "eos_token_id": 128001},
    ),
    "mistral": ModelFamily(
        name="mistral",
        presets={"mistral_7b": mistral_7b, "mistral_tiny": mistral_tiny},
        tokenizer="sentencepiece", chat_template="mistral",
        hf_architecture="MistralForCausalLM", hf_model_type="mistral",
        checkpoint_keys={"meta": META_KEYS, "hf": HF_KEYS},
        hf_token_ids={"bos_token_id": 1, "eos_token_id": 2},
    ),
    "qwen2": ModelFamily(
        name="qwen2",
        presets={"qwen2_5_0_5b": qwen2_5_0_5b, "qwen2_5_1_5b": qwen2_5_1_5b,
                 "qwen2_5_7b": qwen2_5_7b, "qwen2_tiny": qwen2_tiny},
        tokenizer="hf", chat_template="chatml",
        hf_architecture="Qwen2ForCausalLM", hf_model_type="qwen2",
        checkpoint_keys={"hf": HF_KEYS},
        hf_token_ids={"bos_token_id": 151643, "eos_token_id": 151643},
    ),
    "qwen3": ModelFamily(
        name="qwen3",
        presets={"qwen3_0_6b": qwen3_0_6b, "qwen3_1_7b": qwen3_1_7b, "qwen3_4b": qwen3_4b,
                 "qwen3_8b": qwen3_8b, "qwen3_14b": qwen3_14b, "qwen3_32b": qwen3_32b,
                 "qwen3_tiny": qwen3_tiny},
        tokenizer="hf", chat_template="chatml",
        hf_architecture="Qwen3ForCausalLM", hf_model_type="qwen3",
        checkpoint_keys={"hf": HF_KEYS},
        # The ids of the presets' namesakes (Qwen/Qwen3-0.6B ... Qwen3-32B, post-trained:
        # their config.json and tokenizer end turns with <|im_end|> 151645; the -Base repos'
        # EOS, <|endoftext|> 151643, is one of their stop tokens too).
        hf_token_ids={"bos_token_id": 151643, "eos_token_id": 151645},
    ),
    "gemma3": ModelFamily(
        name="gemma3",
        presets={"gemma3_1b": gemma3_1b, "gemma3_4b": gemma3_4b, "gemma3_12b": gemma3_12b,
                 "gemma3_27b": gemma3_27b, "gemma3_tiny": gemma3_tiny},
        tokenizer="sentencepiece", chat_template="gemma",
        hf_architecture="Gemma3ForCausalLM", hf_model_type="gemma3_text",
        checkpoint_keys={"hf": GEMMA_HF_KEYS},
        hf_token_ids={"bos_token_id": 2, "eos_token_id": 1},
    ),
}

# The native layout in template form, every key its own source: every template any family
# maps (the native key schema of the README).
NATIVE_KEYS: dict[str, str] = {
    key: key for family in FAMILIES.values() for templates in family.checkpoint_keys.values()
    for key in templates
}

# Every preset by name: the flat registry that configs (``model: llama3_2_1b``) look up.
MODELS: dict[str, Callable[[], DecoderConfig]] = {
    name: preset for family in FAMILIES.values() for name, preset in family.presets.items()
}

# Preset name -> its family's name.
FAMILY_OF_PRESET: dict[str, str] = {
    name: family.name for family in FAMILIES.values() for name in family.presets
}


def register_family(family: ModelFamily) -> None:
    """Add a family (and its presets) to :data:`FAMILIES`, :data:`MODELS` and
    :data:`FAMILY_OF_PRESET`: what an entry in the ``FAMILIES`` literal above does, for a
    family defined elsewhere (a project's own model on an architecture tune knows).

    Raises:
        ValueError: If the family's name or one of its presets' names is taken.
    """
    if family.name in FAMILIES:
        raise ValueError(f"a model family named '{family.name}' exists already")
    taken = sorted(set(family.presets) & set(MODELS))
    if taken:
        raise ValueError(f"model preset '{taken[0]}' exists already")
    FAMILIES[family.name] = family
    MODELS.update(family.presets)
    FAMILY_OF_PRESET.update(dict.fromkeys(family.presets, family.name))


def unregister_family(name: str) -> None:
    """Remove a family :func:`register_family` added (its presets too)."""
    family = FAMILIES.pop(name)
    for preset in family.presets:
        MODELS.pop(preset, None)
        FAMILY_OF_PRESET.pop(preset, None)


def family_of(preset: str) -> ModelFamily:
    """The family a preset belongs to.

    Args:
        preset: A preset name, e.g. "qwen2_5_7b".

    Raises:
        KeyError: With the known preset names, if there is no such preset.
    """
    if preset not in FAMILY_OF_PRESET:
        raise KeyError(f"no model preset '{preset}'; known: {', '.join(sorted(MODELS))}")
    return FAMILIES[FAMILY_OF_PRESET[preset]]
