"""An independent statement of the HF -> native key map, for tests of tune-models.

tune-ckpt has the real converter (tested on its own) and tune-models' registry holds the key
templates it will use; the model tests use this one so that a bug in either and a bug in the
model cannot hide each other.
"""

from __future__ import annotations

import torch


def hf_to_native_reference(sd: dict[str, torch.Tensor], n_layers: int, n_heads: int,
                           n_kv_heads: int, tied: bool = False) -> dict[str, torch.Tensor]:
    """transformers Llama/Mistral/Qwen2 names -> the native schema (q/k rows un-permuted).

    q/k/v biases (Qwen2) become ``wqkv.bias``, permuted like the weight rows; with ``tied``
    there is no ``output.weight`` (the model projects with ``tok_embeddings.weight``).
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
        out[f"layers.{i}.attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[f"layers.{i}.feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[f"layers.{i}.feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[f"layers.{i}.feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    return out


def hf_config(cfg, architecture: str = "llama", **extra):
    """transformers' config of cfg's shape for ``architecture`` ("llama", "mistral", "qwen2").

    Raises:
        ValueError: If that architecture cannot express cfg (q/k/v biases are Qwen2's, a
            sliding window is Mistral's).
    """
    import transformers

    if cfg.qkv_bias != (architecture == "qwen2"):
        raise ValueError(f"{architecture} cannot express qkv_bias={cfg.qkv_bias}")
    if cfg.sliding_window is not None and architecture != "mistral":
        raise ValueError(f"{architecture} reference has no sliding window here")
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
    config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                    "qwen2": transformers.Qwen2Config}[architecture]
    return config_class(**kwargs, **extra)


def hf_model(cfg, architecture: str = "llama", **extra):
    """transformers' *ForCausalLM of cfg's shape with its own random weights, in eval mode."""
    import transformers

    model_class = {"llama": transformers.LlamaForCausalLM,
                   "mistral": transformers.MistralForCausalLM,
                   "qwen2": transformers.Qwen2ForCausalLM}[architecture]
    return model_class(hf_config(cfg, architecture, **extra)).eval()


def hf_and_native(cfg, seed: int = 0, architecture: str = "llama", **hf_config_extra):
    """transformers' model of cfg's shape with random weights, and a tune_models.Decoder
    holding the same weights (through the map above); both in eval mode.

    RMSNorm gains and biases are randomised too (HF starts them at ones and zeros), so they
    are compared as well. Extra keyword arguments go to the transformers config.
    """
    from tune_models import Decoder

    torch.manual_seed(seed)
    hf = hf_model(cfg, architecture, **hf_config_extra)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
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
    embeddings; mistral's window (16) and llama3's original context (48) are shorter than the
    sequences the tests use, so both matter.
    """
    import dataclasses

    from tune_models import DecoderConfig, llama3_tiny, mistral_tiny, qwen2_tiny

    return {
        "llama2": (DecoderConfig(vocab_size=vocab_size, dim=96, n_layers=3, n_heads=6,
                                 n_kv_heads=2, multiple_of=32, max_seq_len=128,
                                 rope_theta=500000.0), "llama"),
        "llama3_1": (dataclasses.replace(llama3_tiny(vocab_size), tie_embeddings=False),
                     "llama"),
        "llama3_2": (llama3_tiny(vocab_size), "llama"),
        "mistral": (mistral_tiny(vocab_size), "mistral"),
        "qwen2": (qwen2_tiny(vocab_size), "qwen2"),
    }


def native_to_hf_reference(sd: dict[str, torch.Tensor], n_layers: int, n_heads: int,
                           n_kv_heads: int, tied: bool = False) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hf_to_native_reference`: native -> transformers names, q/k rows
    (and biases) permuted back to HF's rotate-half order; ``lm_head.weight`` is the embedding
    when ``tied``."""

    def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
        rows = w.shape[0]
        cols = w.shape[1:]
        return w.view(heads, rows // heads // 2, 2, *cols).transpose(1, 2).reshape(rows, *cols)

    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"],
           "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["tok_embeddings.weight" if tied else "output.weight"]}
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
        out[p + "self_attn.o_proj.weight"] = sd[f"layers.{i}.attention.wo.weight"]
        out[p + "mlp.gate_proj.weight"] = sd[f"layers.{i}.feed_forward.w1.weight"]
        out[p + "mlp.down_proj.weight"] = sd[f"layers.{i}.feed_forward.w2.weight"]
        out[p + "mlp.up_proj.weight"] = sd[f"layers.{i}.feed_forward.w3.weight"]
        out[p + "input_layernorm.weight"] = sd[f"layers.{i}.attention_norm.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[f"layers.{i}.ffn_norm.weight"]
    return out
