"""Decode throughput of tune_models.generate vs transformers' generate, CPU fp32.

    uv run python benchmarks/generate.py [--rounds 3] [--new-tokens 128] [--threads 2]
                                         [--clock wall|cpu] [--compile]

A ~20M-parameter Llama 2 (tune_models.llama2_20m, random weights) is built once in
transformers and mapped into tune_models.Decoder, so both decode with the same weights. For
batch 1 and batch 8 (prompts of different lengths, left-padded for both) each round runs
greedy decoding of --new-tokens tokens with ours, then with transformers' generate
(sdpa attention, its default dynamic cache), alternating. New tokens per second counts every
row's new tokens over the whole call (prefill included). Prints medians, spread, whether the
tokens agree, and the ratio last. `--compile` adds a third contender, our decode step under
torch.compile (inductor's C++ code on CPU; it removes the per-op overhead that dominates a
one-token step of a model this small).

On a shared machine, two OpenMP threads that compete with other processes spend most of a
decode step waiting for each other, and wall-clock figures say more about the neighbours
than about the code. `--threads 1 --clock cpu` then measures the CPU time of the one thread
that does all the work (time.thread_time), which the neighbours do not inflate.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tune_ckpt import hf_to_native
from tune_models import Decoder, DecoderConfig, generate, llama2_20m

from _timing import alternate, median, summary


def hf_llama(cfg: DecoderConfig) -> LlamaForCausalLM:
    """transformers' LlamaForCausalLM of the same shape, eos disabled (random weights)."""
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads, rms_norm_eps=cfg.norm_eps,
            max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
            attn_implementation="sdpa", pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
    ).eval()
    # Random weights emit any token, EOS included: decode the full length in both.
    hf.generation_config.eos_token_id = None
    return hf


def same_weights(cfg: DecoderConfig) -> tuple[Decoder, LlamaForCausalLM]:
    hf = hf_llama(cfg)
    with torch.device("meta"):
        ours = Decoder(cfg)
    # The real converter (tune-ckpt), as a user's HF checkpoint would go through it.
    state = hf_to_native(hf.state_dict(), n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads)
    ours.load_state_dict(state, strict=True, assign=True)
    return ours.eval(), hf


def hf_generate(hf: LlamaForCausalLM, prompts: list[list[int]], n: int) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    device = hf.lm_head.weight.device
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    attention = torch.tensor(
        [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device
    )
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids, attention_mask=attention, do_sample=False, max_new_tokens=n,
            min_new_tokens=n, pad_token_id=0,
        )
    return out[:, width:].tolist()


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of rows whose first half of the tokens agree (random weights: near-ties later)."""
    half = len(a[0]) // 2
    return sum(x[:half] == y[:half] for x, y in zip(a, b)) / len(a)


def bench(
    ours: Decoder, hf: LlamaForCausalLM, batch: int, n: int, rounds: int, clock,
    compiled: bool = False,
) -> tuple[float, float | None]:
    g = torch.Generator().manual_seed(batch)
    lengths = [16 + 3 * i for i in range(batch)]  # ragged prompts, 16..37 tokens
    prompts = [torch.randint(3, ours.config.vocab_size, (k,), generator=g).tolist()
               for k in lengths]
    outputs = {}

    def runner(name, fn):
        def run() -> float:
            start = clock()
            outputs[name] = fn()
            return batch * n / (clock() - start)

        return run

    runs = {
        "tune": runner("tune", lambda: generate(ours, prompts, n)),
        "transformers": runner("transformers", lambda: hf_generate(hf, prompts, n)),
    }
    if compiled:
        # A cache set up by the caller is kept between calls, so the compiled step (static
        # shapes) is built once in the warm-up and replayed in every round.
        def compiled_generate():
            ours.setup_caches(batch, max(lengths) + n)
            try:
                return generate(ours, prompts, n, compile=True)
            finally:
                ours.clear_caches()

        runs["tune compiled"] = runner("tune compiled", compiled_generate)
    start = time.perf_counter()
    for run in runs.values():  # warm-up (and compilation)
        run()
    warm_up = time.perf_counter() - start
    res = alternate(runs, rounds)
    ratio = median(res["tune"]) / median(res["transformers"])
    print(f"batch {batch}, prompts {lengths[0]}..{lengths[-1]} tokens, {n} new tokens each:")
    for k, v in res.items():
        print(f"  {k:13s} new tokens/s {summary(v)}")
    agree = agreement(outputs["tune"], outputs["transformers"])
    print(f"  greedy tokens agree (first half) in {agree:.0%} of rows")
    c_ratio = None
    if compiled:
        print(f"  warm-up incl. compilation: {warm_up:.0f} s")
        same = outputs["tune compiled"] == outputs["tune"]
        print(f"  compiled tokens equal eager ones: {same}")
        c_ratio = median(res["tune compiled"]) / median(res["transformers"])
        print(f"  ratio tune compiled / transformers: {c_ratio:.2f}")
    print(f"  ratio tune / transformers: {ratio:.2f}")
    return ratio, c_ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads for both (2 = this machine's cores)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: the thread's CPU time (needs --threads 1)")
    parser.add_argument("--compile", action="store_true",
                        help="also time generate(..., compile=True) (needs a C++ compiler)")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu counts one thread's CPU time: use it with --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = llama2_20m()
    ours, hf = same_weights(cfg)
    params = sum(p.numel() for p in ours.parameters())
    print(f"llama2_20m ({params / 1e6:.1f}M params), CPU fp32, greedy, "
          f"{torch.get_num_threads()} threads, {args.clock} clock")
    ratios = [bench(ours, hf, batch, args.new_tokens, args.rounds, clock, args.compile)
              for batch in (1, 8)]
    if args.compile:
        print(f"ratio tune compiled / transformers: batch 1 {ratios[0][1]:.2f}, "
              f"batch 8 {ratios[1][1]:.2f}")
    print(f"ratio tune / transformers: batch 1 {ratios[0][0]:.2f}, batch 8 {ratios[1][0]:.2f}")


if __name__ == "__main__":
    main()
