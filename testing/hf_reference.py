"""An independent statement of the HF -> native key map, for tests of tune-models.

tune-ckpt has the real converter (tested on its own); the model tests use this one so that a
bug in the converter and a bug in the model cannot hide each other.
"""

from __future__ import annotations

import torch


def hf_to_native_reference(sd: dict[str, torch.Tensor], n_layers: int, n_heads: int,
                           n_kv_heads: int) -> dict[str, torch.Tensor]:
    """transformers LlamaForCausalLM names -> the native schema (q/k rows un-permuted)."""

    def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
        # HF rotates halves of each head; native rotates adjacent pairs (Meta's layout).
        rows, cols = w.shape
        return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)

    out = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(n_layers):
        p = f"model.layers.{i}."
        q = unpermute(sd[p + "self_attn.q_proj.weight"], n_heads)
        k = unpermute(sd[p + "self_attn.k_proj.weight"], n_kv_heads)
        out[f"layers.{i}.attention.wqkv.weight"] = torch.cat(
            [q, k, sd[p + "self_attn.v_proj.weight"]]
        )
        out[f"layers.{i}.attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[f"layers.{i}.feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[f"layers.{i}.feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[f"layers.{i}.feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    return out


def hf_and_native(cfg, seed: int = 0, **hf_config):
    """transformers' LlamaForCausalLM of cfg's shape with random weights, and a
    tune_models.Llama2 holding the same weights (through the map above); both in eval mode.

    RMSNorm gains are randomised too (HF starts them at ones), so they are compared as well.
    Extra keyword arguments go to ``transformers.LlamaConfig``.
    """
    import transformers

    from tune_models import Llama2

    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
        attn_implementation="sdpa", **hf_config,
    )).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    with torch.device("meta"):
        ours = Llama2(cfg)
    state = hf_to_native_reference(hf.state_dict(), cfg.n_layers, cfg.n_heads, cfg.n_kv_heads)
    ours.load_state_dict(state, strict=True, assign=True)
    return hf, ours.eval()
