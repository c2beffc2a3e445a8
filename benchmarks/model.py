"""Training-step throughput and peak memory of tune_models.Decoder vs transformers, CPU fp32.

    uv run python benchmarks/model.py [--rounds 3] [--steps 3] [--models qwen3_30m,gemma3_30m]

One training step is forward, the summed next-token loss, backward, AdamW and zero_grad. The
models: llama2_tiny (batch 4 x 256) and llama2_20m (4 x 512) as before, and two ~30M models
at batch 2 x 1024 whose real vocabularies make the output projection and the loss most of the
work: a Llama-3.1-shaped one (vocab 128256, llama3 RoPE scaling, separate output matrix), a
Qwen2.5-shaped one (vocab 151936, q/k/v biases, tied embeddings), a Qwen3-shaped one (QK-norm,
heads twice as wide as dim / n_heads, tied) and a Gemma-3-shaped one (vocab 262144, five
local layers with a 512-position window to one global, both RoPE bases, GeGLU, four norms per
layer, tied). The peer is transformers' LlamaForCausalLM / Qwen2ForCausalLM /
Qwen3ForCausalLM / Gemma3ForCausalLM (sdpa) of the same shape.

Every measurement is its own process, alternating tune and transformers each round, so
neither side's run can leave anything behind for the other's. "Peak memory" is the peak of
the bytes torch's CPU allocator holds for tensors, from before the model is built through
the warm-up step and one more step (weights, gradients, AdamW state, activations, logits):
the running total that torch.profiler records with profile_memory=True, the CPU counterpart
of CUDA's max_memory_allocated. The resident set size would not do: it also counts the pages
of torch's and MKL's code that each run touches first, a few hundred MB on both sides. The
profiled steps are not timed; the timed steps run without the profiler. Prints medians
(min, max) and the ratios last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "testing"))  # hf_reference: transformers twin of a config

from _timing import median, summary, timed  # noqa: E402

# name -> (preset builder, transformers architecture, batch, seq)
MODELS = {
    "llama2_tiny": ("llama2_tiny", "llama", 4, 256),
    "llama2_20m": ("llama2_20m", "llama", 4, 512),
    "llama3_30m": ("llama3_30m", "llama", 2, 1024),
    "qwen2_30m": ("qwen2_30m", "qwen2", 2, 1024),
    "qwen3_30m": ("qwen3_30m", "qwen3", 2, 1024),
    "gemma3_30m": ("gemma3_30m", "gemma3", 2, 1024),
}


def config(name: str):
    import dataclasses

    from tune_models import DecoderConfig, gemma3_1b, llama2_20m, llama2_tiny, qwen3_tiny

    if name == "llama2_tiny":
        return llama2_tiny()
    if name == "llama2_20m":
        return llama2_20m()
    if name == "llama3_30m":
        # Llama 3.1 8B's proportions (4:1 grouped-query, FFN 3.5x, RoPE) at width 128.
        return DecoderConfig(
            vocab_size=128256, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=448,
            max_seq_len=1024, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        )
    if name == "qwen2_30m":
        # Qwen2.5 0.5B's proportions (3:1 grouped-query, FFN ~5.4x, biases, tied) at width 192.
        return DecoderConfig(
            vocab_size=151936, dim=192, n_layers=4, n_heads=6, n_kv_heads=2, hidden_dim=1024,
            max_seq_len=1024, norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True,
            tie_embeddings=True,
        )
    if name == "qwen3_30m":
        # Qwen3 0.6B's proportions (2:1 grouped-query, q width 2x dim, FFN 3x, QK-norm, tied)
        # at width 192.
        return dataclasses.replace(qwen3_tiny(), dim=192, n_layers=4, n_heads=6, n_kv_heads=3,
                                   head_dim=64, hidden_dim=576, max_seq_len=1024)
    if name == "gemma3_30m":
        # Gemma 3 1B's proportions (4:1 grouped-query, q width 2x dim, FFN 6x) at width 128:
        # six layers, the last global, the window half the sequence.
        return dataclasses.replace(gemma3_1b(), dim=128, n_layers=6, n_heads=4, n_kv_heads=1,
                                   head_dim=64, hidden_dim=768, query_pre_attn_scalar=64,
                                   max_seq_len=1024)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def _peak_allocated_mib(prof) -> float:
    """Peak of torch's running total of CPU tensor bytes over a profiled region."""
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    return max(totals, default=0) / 2**20


def child(name: str, side: str, steps: int) -> dict:
    """One measurement in this (fresh) process; returns tokens/s and peak memory in MiB."""
    import torch
    from hf_reference import hf_model
    from torch.profiler import ProfilerActivity, profile

    from tune_models import Decoder

    torch.set_num_threads(2)
    _, architecture, batch, seq = MODELS[name]
    cfg = config(name)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq))
        if side == "tune":
            model = Decoder(cfg)
            model.init_weights()
            targets = torch.cat([tokens[:, 1:], torch.full((batch, 1), -100)], dim=1)
            n = (targets != -100).sum()

            def loss():
                return model(tokens, labels=targets) / n
        else:
            model = hf_model(cfg, architecture).train()

            def loss():
                return model(tokens, labels=tokens).loss

        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up: AdamW state exists from here on
        step()
    peak = _peak_allocated_mib(prof)
    elapsed = timed(lambda: [step() for _ in range(steps)])
    return {"tokens_per_s": batch * seq * steps / elapsed, "peak_mib": peak,
            "params": sum(p.numel() for p in model.parameters())}


def measure(name: str, side: str, steps: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", name, side, "--steps", str(steps)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(name: str, steps: int, rounds: int) -> tuple[float, float]:
    runs: dict[str, list[dict]] = {"tune": [], "transformers": []}
    for _ in range(rounds):
        for side in runs:
            runs[side].append(measure(name, side, steps))
    _, _, batch, seq = MODELS[name]
    params = runs["tune"][0]["params"]
    print(f"{name} ({params / 1e6:.1f}M params, batch {batch} x {seq}, {steps} steps/round):")
    for side, results in runs.items():
        print(f"  {side:13s} tokens/s {summary([r['tokens_per_s'] for r in results])}")
        print(f"  {'':13s} peak MiB {summary([r['peak_mib'] for r in results], 0)}")
    speed = median([r["tokens_per_s"] for r in runs["tune"]]) / median(
        [r["tokens_per_s"] for r in runs["transformers"]])
    memory = median([r["peak_mib"] for r in runs["tune"]]) / median(
        [r["peak_mib"] for r in runs["transformers"]])
    print(f"  ratio tune / transformers: speed {speed:.2f}x, peak memory {memory:.2f}x",
          flush=True)
    return speed, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.steps)))
        return
    names = args.models.split(",")
    results = {name: bench(name, args.steps, args.rounds) for name in names}
    print("summary (tune / transformers):")
    for name, (speed, memory) in results.items():
        print(f"  {name:12s} speed {speed:.2f}x   peak memory {memory:.2f}x")


if __name__ == "__main__":
    main()
