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
