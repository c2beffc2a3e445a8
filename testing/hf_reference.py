"""An independent statement of the HF -> native key map, for tests of tune-models.

tune-ckpt has the real converter (tested on its own) and tune-models' registry holds the key
templates it will use; the model tests use this one so that a bug in either and a bug in the
model cannot hide each other.
"""

from __future__ import annotations

import torch

# transformers' per-layer norm names -> native ones. Gemma 2/3 name four norms and call the
# norm on attention's output "post_attention" (in Llama that is the one before the MLP).
_LLAMA_NORMS = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
_GEMMA_NORMS = {"input_layernorm": "attention_norm",
                "post_attention_layernorm": "attention_post_norm",
                "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "ffn_post_norm"}


def hf_to_native_reference(sd: dict[str, torch.Tensor], n_layers: int, n_heads: int,
                           n_kv_heads: int, tied: bool = False) -> dict[str, torch.Tensor]:
    """transformers Llama/Mistral/Qwen2/Qwen3/Gemma names -> the native schema (q/k rows
    un-permuted).

    q/k/v biases (Qwen2) become ``wqkv.bias``, permuted like the weight rows; QK-norm gains
    (Qwen3, Gemma) are one head's rows, permuted as a head; a model with
    ``pre_feedforward_layernorm`` has Gemma's four norms. With ``tied`` there is no
    ``output.weight`` (the model projects with ``tok_embeddings.weight``).
    """

    def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
        # HF rotates halves of each head; native rotates adjacent pairs (Meta's layout). A
        # bias is a weight with one column.
        rows = w.shape[0]
        cols = w.shape[1:]
        return w.view(heads, 2, rows // heads // 2, *cols).transpose(1, 2).reshape(rows, *cols)

    out = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
    }
    if not tied:
        out["output.weight"] = sd["lm_head.weight"]
    gemma = "model.layers.0.pre_feedforward_layernorm.weight" in sd
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            if p + f"self_attn.q_proj.{kind}" not in sd:
                continue
            q = unpermute(sd[p + f"self_attn.q_proj.{kind}"], n_heads)
            k = unpermute(sd[p + f"self_attn.k_proj.{kind}"], n_kv_heads)
            out[f"layers.{i}.attention.wqkv.{kind}"] = torch.cat(
                [q, k, sd[p + f"self_attn.v_proj.{kind}"]]
            )
        for norm in ("q_norm", "k_norm"):
            if p + f"self_attn.{norm}.weight" in sd:
                out[f"layers.{i}.attention.{norm}.weight"] = unpermute(
                    sd[p + f"self_attn.{norm}.weight"], 1)
        out[f"layers.{i}.attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[f"layers.{i}.feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[f"layers.{i}.feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[f"layers.{i}.feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        for hf_name, native in (_GEMMA_NORMS if gemma else _LLAMA_NORMS).items():
            out[f"layers.{i}.{native}.weight"] = sd[p + f"{hf_name}.weight"]
    return out


# What each reference architecture fixes: DecoderConfig field -> the value it always has.
_PLAIN = {"qkv_bias": False, "qk_norm": False, "norm_unit_offset": False, "post_norms": False,
          "activation": "silu", "scale_embeddings": False}
_GEMMA = {"qkv_bias": False, "norm_unit_offset": True, "post_norms": True,
          "activation": "gelu_tanh", "scale_embeddings": True}
_FIXED = {"llama": _PLAIN, "mistral": _PLAIN, "qwen2": {**_PLAIN, "qkv_bias": True},
          "qwen3": {**_PLAIN, "qk_norm": True}, "gemma2": {**_GEMMA, "qk_norm": False},
          "gemma3": {**_GEMMA, "qk_norm": True}}


def _layer_types(cfg) -> list[str]:
    from tune_models import uses_sliding_window

    return ["sliding_attention" if uses_sliding_window(cfg, i) else "full_attention"
            for i in range(cfg.n_layers)]


def hf_config(cfg, architecture: str = "llama", **extra):
    """transformers' config of cfg's shape for ``architecture`` ("llama", "mistral", "qwen2",
    "qwen3", "gemma2", "gemma3"; Gemma 3 as its text decoder, Gemma3TextConfig).

    Raises:
        ValueError: If that architecture cannot express cfg (q/k/v biases are Qwen2's, a
            sliding window is Mistral's or Gemma's, ...).
    """
    import transformers

    for name, value in _FIXED[architecture].items():
        if getattr(cfg, name) != value:
            raise ValueError(f"{architecture} cannot express {name}={getattr(cfg, name)!r}")
    gemma = architecture.startswith("gemma")
    if cfg.sliding_window is not None and architecture not in ("mistral", "gemma2", "gemma3"):
        raise ValueError(f"{architecture} reference has no sliding window here")
    if not gemma and (cfg.sliding_window_pattern or cfg.rope_local_theta or
                      cfg.query_pre_attn_scalar or cfg.attn_logit_softcap or
                      cfg.final_logit_softcap):
        raise ValueError(f"{architecture} has no local/global layers, query scale or softcaps")
    kwargs = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa",
    )
    if cfg.rope_scaling is not None:
        kwargs["rope_scaling"] = dict(cfg.rope_scaling)
    if architecture == "mistral":
        kwargs["sliding_window"] = cfg.sliding_window
    if gemma:
        del kwargs["rope_theta"]
        kwargs.pop("rope_scaling", None)
        full = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
        if cfg.rope_local_theta is None:
            local = full
        kwargs.update(
            hidden_activation="gelu_pytorch_tanh", sliding_window=cfg.sliding_window,
            layer_types=_layer_types(cfg), final_logit_softcapping=cfg.final_logit_softcap,
            attn_logit_softcapping=cfg.attn_logit_softcap,
            query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
            rope_parameters=({"full_attention": full, "sliding_attention": local}
                             if architecture == "gemma3" else full),
        )
        if architecture == "gemma2":
            kwargs["attn_implementation"] = "eager"  # transformers soft-caps in eager only
    config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                    "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
                    "gemma2": transformers.Gemma2Config,
                    "gemma3": transformers.Gemma3TextConfig}[architecture]
    return config_class(**kwargs, **extra)


def hf_model(cfg, architecture: str = "llama", **extra):
    """transformers' *ForCausalLM of cfg's shape with its own random weights, in eval mode."""
    import transformers

    model_class = {"llama": transformers.LlamaForCausalLM,
                   "mistral": transformers.MistralForCausalLM,
                   "qwen2": transformers.Qwen2ForCausalLM,
                   "qwen3": transformers.Qwen3ForCausalLM,
                   "gemma2": transformers.Gemma2ForCausalLM,
                   "gemma3": transformers.Gemma3ForCausalLM}[architecture]
    return model_class(hf_config(cfg, architecture, **extra)).eval()


def hf_and_native(cfg, seed: int = 0, architecture: str = "llama", **hf_config_extra):
    """transformers' model of cfg's shape with random weights, and a tune_models.Decoder
    holding the same weights (through the map above); both in eval mode.

    RMSNorm gains and biases are randomised too (HF starts them at ones and zeros; Gemma's
    gains, stored minus one, at zeros), so they are compared as well. Extra keyword arguments
    go to the transformers config.
    """
    from tune_models import Decoder

    torch.manual_seed(seed)
    hf = hf_model(cfg, architecture, **hf_config_extra)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5) if cfg.norm_unit_offset else p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
    with torch.device("meta"):
        ours = Decoder(cfg)
    state = hf_to_native_reference(hf.state_dict(), cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
                                   tied=cfg.tie_embeddings)
    ours.load_state_dict(state, strict=True, assign=True)
    return hf, ours.eval()


def family_twins(vocab_size: int = 256) -> dict[str, tuple]:
    """One tiny config per family (two for Llama 3.x) and the transformers architecture that
    is its reference: name -> (DecoderConfig, architecture).

    llama3_1 has Llama 3.1's RoPE scaling with separate output weights, llama3_2 adds tied
    embeddings; mistral's window (16), gemma3's (8) and llama3's original context (48) are
    shorter than the sequences the tests use, so they matter. qwen3 has QK-norm and heads
    wider than dim / n_heads; gemma3 every Gemma 3 feature (six layers: five local ones with
    RoPE base 10k, one global with base 1M scaled by 8).
    """
    import dataclasses

    from tune_models import (
        DecoderConfig,
        gemma3_tiny,
        llama3_tiny,
        mistral_tiny,
        qwen2_tiny,
        qwen3_tiny,
    )

    return {
        "llama2": (DecoderConfig(vocab_size=vocab_size, dim=96, n_layers=3, n_heads=6,
                                 n_kv_heads=2, multiple_of=32, max_seq_len=128,
                                 rope_theta=500000.0), "llama"),
        "llama3_1": (dataclasses.replace(llama3_tiny(vocab_size), tie_embeddings=False),
                     "llama"),
        "llama3_2": (llama3_tiny(vocab_size), "llama"),
        "mistral": (mistral_tiny(vocab_size), "mistral"),
        "qwen2": (qwen2_tiny(vocab_size), "qwen2"),
        "qwen3": (qwen3_tiny(vocab_size), "qwen3"),
        "gemma3": (gemma3_tiny(vocab_size), "gemma3"),
    }


def native_to_hf_reference(sd: dict[str, torch.Tensor], n_layers: int, n_heads: int,
                           n_kv_heads: int, tied: bool = False) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hf_to_native_reference`: native -> transformers names, q/k rows
    (and biases, and QK-norm gains) permuted back to HF's rotate-half order; Gemma's four
    norms where the state dict has ``ffn_post_norm``; ``lm_head.weight`` is the embedding when
    ``tied``."""

    def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
        rows = w.shape[0]
        cols = w.shape[1:]
        return w.view(heads, rows // heads // 2, 2, *cols).transpose(1, 2).reshape(rows, *cols)

    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"],
           "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["tok_embeddings.weight" if tied else "output.weight"]}
    gemma = "layers.0.ffn_post_norm.weight" in sd
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            fused = sd.get(f"layers.{i}.attention.wqkv.{kind}")
            if fused is None:
                continue
            head_dim = fused.shape[0] // (n_heads + 2 * n_kv_heads)
            q, k, v = fused.split([n_heads * head_dim, n_kv_heads * head_dim,
                                   n_kv_heads * head_dim])
            out[p + f"self_attn.q_proj.{kind}"] = permute(q, n_heads)
            out[p + f"self_attn.k_proj.{kind}"] = permute(k, n_kv_heads)
            out[p + f"self_attn.v_proj.{kind}"] = v
        for norm in ("q_norm", "k_norm"):
            if f"layers.{i}.attention.{norm}.weight" in sd:
                out[p + f"self_attn.{norm}.weight"] = permute(
                    sd[f"layers.{i}.attention.{norm}.weight"], 1)
        out[p + "self_attn.o_proj.weight"] = sd[f"layers.{i}.attention.wo.weight"]
        out[p + "mlp.gate_proj.weight"] = sd[f"layers.{i}.feed_forward.w1.weight"]
        out[p + "mlp.down_proj.weight"] = sd[f"layers.{i}.feed_forward.w2.weight"]
        out[p + "mlp.up_proj.weight"] = sd[f"layers.{i}.feed_forward.w3.weight"]
        for hf_name, native in (_GEMMA_NORMS if gemma else _LLAMA_NORMS).items():
            out[p + f"{hf_name}.weight"] = sd[f"layers.{i}.{native}.weight"]
    return out
