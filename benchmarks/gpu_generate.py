"""GPU check: 7B-shaped greedy decoding, ours (eager and compiled) beside transformers.

    python benchmarks/gpu_generate.py [--new-tokens 256] [--rounds 3]

Needs only torch and transformers: tune_models is imported from packages/tune-models/src of
this checkout. Builds a Llama-2-7B-shaped LlamaForCausalLM with random bf16 weights on the
GPU, maps the same weights into tune_models.Decoder, and decodes --new-tokens tokens at
batch 1 from a random prompt with:

  transformers   hf.generate(do_sample=False), sdpa attention, its default dynamic cache
  tune eager     tune_models.generate(model, ...)
  tune compiled  tune_models.generate(model, ..., compile=True)  (CUDA graphs)

The compiled step is compiled once (timed separately) before the rounds; each round runs all
three in turn. Prints tokens/s (median and spread), the peak GPU memory of each run, the
achieved weight-read bandwidth, and the ratios last. Made to finish in one 10-minute call with
start-up: later rounds are skipped, with a note, once --time-budget seconds have passed.
`--preset tiny --device cpu` runs the same code on a tiny model (a dry run without a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import tune_models  # noqa: F401
except ImportError:  # a bare torch + transformers environment: use this checkout's source
    sys.path.insert(0, str(ROOT / "packages" / "tune-models" / "src"))
    import tune_models  # noqa: F401

from generate import hf_generate, hf_llama, hf_to_native  # noqa: E402 (benchmarks/generate.py)

from tune_models import Decoder, DecoderConfig, generate, llama2_7b  # noqa: E402

START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", flush=True)


def build(cfg: DecoderConfig, device: torch.device, dtype: torch.dtype):
    # Construct directly on the device in the target dtype: a 7B fp32 init on the host
    # would take minutes and 27 GB.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            hf = hf_llama(cfg)
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.device("meta"):
        ours = Decoder(cfg)
    # Same tensors where the layouts agree; the fused wqkv is a new tensor.
    ours.load_state_dict(hf_to_native(hf.state_dict(), cfg), strict=True, assign=True)
    return ours.eval(), hf


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, n_new: int, device: torch.device) -> tuple[float, float, list[int]]:
    """tokens/s, peak memory (GiB) during the call, tokens."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    tokens = fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return n_new / seconds, peak, tokens


def first_divergence(a: list[int], b: list[int]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"first {i} tokens equal"
    return f"all {min(len(a), len(b))} tokens equal"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--time-budget", type=float, default=420.0,
                        help="seconds after which no new round starts")
    parser.add_argument("--preset", choices=["7b", "tiny"], default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run on a GPU machine, or try --preset tiny --device cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    if args.preset == "7b":
        cfg = llama2_7b()
    else:
        cfg = DecoderConfig(vocab_size=32000, dim=128, n_layers=2, n_heads=4, multiple_of=32,
                           max_seq_len=512)
    log(f"torch {torch.__version__}, device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")  # noqa: E501
    ours, hf = build(cfg, device, dtype)
    n_params = sum(p.numel() for p in ours.parameters())
    weight_bytes = n_params * torch.finfo(dtype).bits // 8
    log(f"built {args.preset}: {n_params / 1e9:.2f}B params, {dtype}, "
        f"{torch.cuda.memory_allocated() / 2**30 if device.type == 'cuda' else 0:.1f} GiB "
        "allocated (both models; they share all weights but the fused wqkv)")

    prompt = [torch.randint(3, cfg.vocab_size, (args.prompt_len,)).tolist()]
    n = args.new_tokens
    # One cache for all of our runs: the compiled step keeps its graph and its CUDA graph.
    ours.setup_caches(1, args.prompt_len + n)

    runs = {
        "transformers": lambda: hf_generate(hf, prompt, n)[0],
        "tune eager": lambda: generate(ours, prompt, n)[0],
    }
    if not args.no_compile:
        runs["tune compiled"] = lambda: generate(ours, prompt, n, compile=True)[0]

    # Warm-up: kernels, allocator, and the compilation of the decode step.
    generate(ours, prompt, 8)
    hf_generate(hf, prompt, 8)
    if "tune compiled" in runs:
        start = time.perf_counter()
        generate(ours, prompt, n, compile=True)  # compiles, then records the CUDA graph
        generate(ours, prompt, 8, compile=True)
        log(f"compiled the decode step in {time.perf_counter() - start:.1f} s")

    tokens_per_s = {k: [] for k in runs}
    peaks = {k: [] for k in runs}
    outputs = {}
    for r in range(args.rounds):
        if r > 0 and time.perf_counter() - START > args.time_budget:
            log(f"time budget reached: stopping after {r} rounds")
            break
        for name, fn in runs.items():
            speed, peak, outputs[name] = measure(fn, n, device)
            tokens_per_s[name].append(speed)
            peaks[name].append(peak)
            log(f"round {r + 1} {name:14s} {speed:8.1f} tokens/s  peak {peak:6.2f} GiB")

    print(f"\n{args.preset}, batch 1, prompt {args.prompt_len} tokens, {n} new tokens, greedy, "
          f"{dtype}, {len(tokens_per_s['transformers'])} rounds")
    for name, values in tokens_per_s.items():
        mid = statistics.median(values)
        print(f"  {name:14s} tokens/s median {mid:8.1f} (min {min(values):.1f}, "
              f"max {max(values):.1f}); peak memory {max(peaks[name]):.2f} GiB; "
              f"weights read at {mid * weight_bytes / 1e12:.2f} TB/s")
    for name in runs:
        if name != "transformers":
            print(f"  {name} vs transformers: "
                  f"{first_divergence(outputs[name], outputs['transformers'])}")
    base = statistics.median(tokens_per_s["transformers"])
    for name in runs:
        if name != "transformers":
            ratio = statistics.median(tokens_per_s[name]) / base
            print(f"ratio {name} / transformers: {ratio:.2f}")


if __name__ == "__main__":
    main()
