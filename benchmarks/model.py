"""Forward+backward training-step throughput of tune_models.Llama2 vs transformers, CPU fp32.

    uv run python benchmarks/model.py [--rounds 3] [--steps 5]

Both models get the same shapes and weights and compute the same next-token loss; each round
times `steps` steps of each, alternating. Prints tokens/s and the ratio (ours / transformers).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tune_models import Llama2, Llama2Config, llama2_20m, llama2_tiny

from _timing import alternate, median, summary


def hf_model(cfg: Llama2Config) -> LlamaForCausalLM:
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads, rms_norm_eps=cfg.norm_eps,
            max_position_embeddings=cfg.max_seq_len, attn_implementation="sdpa",
        )
    )


def bench(name: str, cfg: Llama2Config, batch: int, seq: int, steps: int, rounds: int) -> float:
    torch.manual_seed(0)
    ours = Llama2(cfg)
    ours.init_weights()
    hf = hf_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq))
    targets = torch.cat([tokens[:, 1:], torch.full((batch, 1), -100)], dim=1)
    n = (targets != -100).sum()

    def step_ours():
        (ours(tokens, labels=targets) / n).backward()

    def step_hf():
        hf(tokens, labels=tokens).loss.backward()

    def runner(step):
        def run() -> float:
            step()  # warm-up
            start = time.perf_counter()
            for _ in range(steps):
                step()
            return batch * seq * steps / (time.perf_counter() - start)

        return run

    res = alternate({"tune": runner(step_ours), "transformers": runner(step_hf)}, rounds)
    ratio = median(res["tune"]) / median(res["transformers"])
    params = sum(p.numel() for p in ours.parameters())
    print(f"{name} ({params / 1e6:.1f}M params, batch {batch} x {seq}):")
    for k, v in res.items():
        print(f"  {k:13s} tokens/s {summary(v)}")
    print(f"  ratio tune / transformers: {ratio:.2f}")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    bench("llama2_tiny", llama2_tiny(), 4, 256, args.steps, args.rounds)
    bench("llama2_20m", llama2_20m(), 4, 512, args.steps, args.rounds)


if __name__ == "__main__":
    main()
