"""tune-models: one decoder for Llama 2, Llama 3.x, Mistral and Qwen2.5 (torch only).

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
    rope_cache,
    rope_frequencies,
)
from tune_models.families import (
    FAMILIES,
    FAMILY_OF_PRESET,
    HF_KEYS,
    META_KEYS,
    MODELS,
    ModelFamily,
    checkpoint_key_map,
    family_of,
    llama2_7b,
    llama2_13b,
    llama2_20m,
    llama2_70b,
    llama2_tiny,
    llama3_1_8b,
    llama3_1_70b,
    llama3_2_1b,
    llama3_2_3b,
    llama3_tiny,
    mistral_7b,
    mistral_tiny,
    native_shapes,
    qkv_rows,
    qwen2_5_0_5b,
    qwen2_5_1_5b,
    qwen2_5_7b,
    qwen2_tiny,
)
from tune_models.generation import check_sampling, generate, generate_stream, sample_token
from tune_models.kv_cache import KVCache
from tune_models.loss import linear_cross_entropy

# The names from when tune fine-tuned Llama 2 only; code that imported them keeps working.
Llama2 = Decoder
Llama2Config = DecoderConfig

__all__ = [
    "FAMILIES",
    "FAMILY_OF_PRESET",
    "HF_KEYS",
    "META_KEYS",
    "MODELS",
    "Attention",
    "Decoder",
    "DecoderConfig",
    "FeedForward",
    "KVCache",
    "Llama2",
    "Llama2Config",
    "ModelFamily",
    "RMSNorm",
    "TiedOutput",
    "TransformerBlock",
    "apply_rope",
    "check_sampling",
    "checkpoint_key_map",
    "family_of",
    "generate",
    "generate_stream",
    "linear_cross_entropy",
    "llama2_7b",
    "llama2_13b",
    "llama2_20m",
    "llama2_70b",
    "llama2_tiny",
    "llama3_1_8b",
    "llama3_1_70b",
    "llama3_2_1b",
    "llama3_2_3b",
    "llama3_tiny",
    "mistral_7b",
    "mistral_tiny",
    "native_shapes",
    "qkv_rows",
    "qwen2_5_0_5b",
    "qwen2_5_1_5b",
    "qwen2_5_7b",
    "qwen2_tiny",
    "rope_cache",
    "rope_frequencies",
    "sample_token",
]
