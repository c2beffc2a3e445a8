"""tune-models: Llama 2 model code (torch only), importable by any project."""

from tune_models.generation import check_sampling, generate, generate_stream, sample_token
from tune_models.kv_cache import KVCache
from tune_models.llama2 import (
    Attention,
    FeedForward,
    Llama2,
    Llama2Config,
    RMSNorm,
    TransformerBlock,
    apply_rope,
    llama2_7b,
    llama2_13b,
    llama2_20m,
    llama2_70b,
    llama2_tiny,
    rope_cache,
)
from tune_models.loss import linear_cross_entropy

# Presets by name: the registry that configs and the CLI look models up in.
MODELS = {
    "llama2_7b": llama2_7b,
    "llama2_13b": llama2_13b,
    "llama2_70b": llama2_70b,
    "llama2_20m": llama2_20m,
    "llama2_tiny": llama2_tiny,
}

__all__ = [
    "MODELS",
    "Attention",
    "FeedForward",
    "KVCache",
    "Llama2",
    "Llama2Config",
    "RMSNorm",
    "TransformerBlock",
    "apply_rope",
    "check_sampling",
    "generate",
    "generate_stream",
    "linear_cross_entropy",
    "llama2_7b",
    "llama2_13b",
    "llama2_20m",
    "llama2_70b",
    "llama2_tiny",
    "rope_cache",
    "sample_token",
]
