"""config.json of the Qwen3 and Gemma 3 presets as their Hub repositories publish them.

Written by hand from the published values, in the Hub's spelling (transformers 4.x: rope_theta,
rope_scaling, Gemma's rope_local_base_freq and sliding_window_pattern); the multimodal Gemma 3
checkpoints (4B and up) list in ``text_config`` only what differs from Gemma3TextConfig's
defaults, as on the Hub. Qwen3-8B's is not here: ../shared/data/configs/qwen3-8b/config.json is
a re-saved copy of the real file (conftest's ``qwen3_8b_config_path``).
"""

from __future__ import annotations


def _qwen3(hidden: int, layers: int, heads: int, ffn: int, tied: bool) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
        "head_dim": 128, "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02,
        "intermediate_size": ffn, "max_position_embeddings": 40960, "max_window_layers": layers,
        "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": None, "tie_word_embeddings": tied, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 151936,
    }


def _gemma3_multimodal(text: dict) -> dict:
    return {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "boi_token_index": 255999, "eoi_token_index": 256000, "eos_token_id": [1, 106],
        "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
        "text_config": {"model_type": "gemma3_text", "rope_scaling": {"factor": 8.0,
                                                                      "rope_type": "linear"},
                        "sliding_window": 1024, **text},
        "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
        "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16,
                          "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False},
    }


PUBLISHED: dict[str, dict] = {
    "qwen3_0_6b": _qwen3(1024, 28, 16, 3072, tied=True),
    "qwen3_1_7b": _qwen3(2048, 28, 16, 6144, tied=True),
    "qwen3_4b": _qwen3(2560, 36, 32, 9728, tied=True),
    "qwen3_14b": _qwen3(5120, 40, 40, 17408, tied=False),
    "qwen3_32b": _qwen3(5120, 64, 64, 25600, tied=False),
    "gemma3_1b": {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "attention_bias": False, "attention_dropout": 0.0, "attn_logit_softcapping": None,
        "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
        "final_logit_softcapping": None, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
        "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
        "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
        "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
        "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144,
    },
    "gemma3_4b": _gemma3_multimodal({"hidden_size": 2560, "intermediate_size": 10240,
                                     "num_hidden_layers": 34}),
    "gemma3_12b": _gemma3_multimodal({"hidden_size": 3840, "intermediate_size": 15360,
                                      "num_attention_heads": 16, "num_hidden_layers": 48,
                                      "num_key_value_heads": 8}),
    "gemma3_27b": _gemma3_multimodal({"head_dim": 128, "hidden_size": 5376,
                                      "intermediate_size": 21504, "num_attention_heads": 32,
                                      "num_hidden_layers": 62, "num_key_value_heads": 16,
                                      "query_pre_attn_scalar": 168}),
}


def transformers_text_model(config: dict):
    """transformers' causal LM of a published config.json (a multimodal one's text decoder:
    Gemma3ForCausalLM of its text_config), built where the caller's device context says."""
    import transformers

    if config["model_type"] == "gemma3":
        text = transformers.Gemma3TextConfig(
            **{k: v for k, v in config["text_config"].items() if k != "model_type"})
        return transformers.Gemma3ForCausalLM(text)
    hf_config = transformers.AutoConfig.for_model(**config)
    return getattr(transformers, config["architectures"][0])(hf_config)
