"""tune-models: one decoder for Llama 2, Llama 3.x, Mistral, Qwen2.5, Qwen3 and Gemma 3 (torch
only).

Importable by any project: it pulls in nothing but torch.
"""

from tune_models.decoder import (
    Attention,
    Decoder,
    DecoderConfig,
    FeedForward,
    RMSNorm,
    TiedOutput,
    TransformerBlock,
    apply_rope,
    init_parameter_,
    rms_norm,
    rope_cache,
    rope_frequencies,
    softcap,
    uses_sliding_window,
)
from tune_models.dtypes import DTYPES, dtype_of
from tune_models.families import (
    FAMILIES,
    FAMILY_OF_PRESET,
    GEMMA_HF_KEYS,
    HEAD_ROW_KEYS,
    HF_KEYS,
    META_KEYS,
    MODELS,
    NATIVE_KEYS,
    ModelFamily,
    checkpoint_key_map,
    family_of,
    native_shapes,
    qkv_rows,
    register_family,
    unregister_family,
)
from tune_models.generation import check_sampling, generate, generate_stream, sample_token
from tune_models.kv_cache import KVCache
from tune_models.lora import (
    LORA_TARGETS,
    LoRALinear,
    LoRASettings,
    apply_lora,
    check_lora_state_dict,
    init_lora_,
    is_lora_key,
    load_lora_state_dict,
    lora_parameter_shapes,
    lora_settings,
    lora_state_dict,
    merge_lora,
    reset_lora_parameters,
)
from tune_models.loss import linear_cross_entropy
from tune_models.nf4 import NF4Linear, dequantize_nf4, quantize_base, quantize_nf4

# The names from when tune fine-tuned Llama 2 only; code that imported them keeps working.
Llama2 = Decoder
Llama2Config = DecoderConfig

# Every preset function by its name (tune_models.llama3_1_8b, tune_models.qwen3_8b, ...): a
# family's entry in families.FAMILIES is the one place a preset is listed.
globals().update(MODELS)

__all__ = [
    "DTYPES",
    "FAMILIES",
    "FAMILY_OF_PRESET",
    "GEMMA_HF_KEYS",
    "HEAD_ROW_KEYS",
    "HF_KEYS",
    "LORA_TARGETS",
    "META_KEYS",
    "MODELS",
    "NATIVE_KEYS",
    "Attention",
    "Decoder",
    "DecoderConfig",
    "FeedForward",
    "KVCache",
    "Llama2",
    "Llama2Config",
    "LoRALinear",
    "LoRASettings",
    "ModelFamily",
    "NF4Linear",
    "RMSNorm",
    "TiedOutput",
    "TransformerBlock",
    "apply_lora",
    "apply_rope",
    "check_lora_state_dict",
    "check_sampling",
    "checkpoint_key_map",
    "dequantize_nf4",
    "dtype_of",
    "family_of",
    "generate",
    "generate_stream",
    "init_lora_",
    "init_parameter_",
    "is_lora_key",
    "linear_cross_entropy",
    "load_lora_state_dict",
    "lora_parameter_shapes",
    "lora_settings",
    "lora_state_dict",
    "merge_lora",
    "native_shapes",
    "qkv_rows",
    "quantize_base",
    "quantize_nf4",
    "register_family",
    "reset_lora_parameters",
    "rms_norm",
    "rope_cache",
    "rope_frequencies",
    "sample_token",
    "softcap",
    "unregister_family",
    "uses_sliding_window",
] + sorted(MODELS)
