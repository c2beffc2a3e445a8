"""GPU check: full fine-tuning throughput of a 7B-shaped Llama 2 in bf16, tune vs transformers.

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python3 benchmarks/gpu_train.py [--steps 8]

Needs one CUDA GPU with room for a 7B model, bf16 weights and AdamW state (~80 GB+), and only
torch, transformers, sentencepiece, pyyaml and tqdm installed: our packages run from source,
the data are random tokens (never zeros), the tokenizer is trained on the spot. Every phase
runs in its own process so peak memory is its own:

* tune      the full_finetune recipe, one process, no FSDP
* tune-fsdp the same recipe under torchrun with FSDP2 (one process: sharding of size 1)
* hf        transformers' LlamaForCausalLM (sdpa), same shapes, fused AdamW, random batches
            of the same size (on random tokens both losses stay near ln 32000 = 10.37)

Batch 2 x 2048, no activation checkpointing, bf16 weights and optimizer state. Warm-up steps
are excluded; tokens/s is the median of the timed steps (CUDA synchronised); MFU uses
6 x params + 6 x layers x seq x dim FLOPs per token and 989 TFLOP/s (H100/H200 dense bf16).
Finishes in about 5-8 minutes on an H100/H200, start-up included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEQ, BATCH = 2048, 2  # SEQ follows --seq
PEAK_FLOPS = 989e12


def flops_per_token(params: int, layers: int, dim: int) -> float:
    return 6 * params + 6 * layers * SEQ * dim


def phase_tune(args, work: Path) -> dict:
    """full_finetune's build and step, from the library it calls (no checkpoints: a 7B one
    would measure the disk, not us)."""
    import torch

    from tune_data.demo import train_demo_tokenizer
    from tune_train import steps
    from tune_train.config import load_config
    from tune_train.data import training_data
    from tune_train.registry import LOSSES
    from tune_train.run import start_run
    from tune_train.setup import build_tokenizer, model_config, optimizer_for, training_model

    tokenizer = train_demo_tokenizer(work / "tokenizer.model")
    total = args.warmup + args.steps
    cfg = load_config({
        "dataset": "random_tokens", "dataset_args": {"num_samples": BATCH * total * 2},
        "model": args.model, "model_checkpoint": None, "tokenizer": "llama2_tokenizer",
        "tokenizer_checkpoint": str(tokenizer), "model_args": {"vocab_size": 32000},
        "max_seq_len": SEQ, "batch_size": BATCH, "epochs": 1, "max_steps_per_epoch": total,
        "optimizer": "AdamW", "lr": 1e-5, "dtype": "bf16", "device": args.device,
        "enable_fsdp": args.phase == "tune-fsdp", "compile": args.compile,
        "enable_activation_checkpointing": False, "max_grad_norm": 1.0,
        "output_dir": str(work / f"out-{args.phase}"), "metric_loggers": ["jsonl"],
        "plot": False, "shuffle": False,
    })
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    with start_run(cfg, "full_finetune", lora=False) as run:
        tok = build_tokenizer(cfg)
        config = model_config(cfg, tok)
        model = training_model(cfg, run, config, None)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = optimizer_for(cfg, params, run.device)
        data = training_data(cfg, tok, run)
        loss_fn = LOSSES[cfg.loss]
        rates, losses = [], []
        for step, micro_batches in enumerate(data.steps(0)):
            sync()
            start = time.perf_counter()
            tokens = steps.count_tokens(micro_batches, run.device)
            loss_sum = torch.zeros((), device=run.device)
            for batch in micro_batches:
                loss = loss_fn(model, steps.to_device(batch, run.device))
                (loss * tokens.loss_weight()).backward()
                loss_sum += loss.detach()
            losses.append(steps.mean_loss(loss_sum, tokens, step + 1))
            steps.optimizer_step(optimizer, params, lr=cfg.lr, max_grad_norm=cfg.max_grad_norm,
                                 step=step + 1)
            sync()
            if step >= args.warmup:
                rates.append(tokens.seen / (time.perf_counter() - start))
        n_params = sum(p.numel() for p in model.parameters())
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0
    return {"tokens_per_second": statistics.median(rates), "peak_gib": peak,
            "loss_first": losses[0], "loss_last": losses[-1],
            "flops_per_token": flops_per_token(n_params, config.n_layers, config.dim)}


def phase_hf(args, work: Path) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tune_models import MODELS

    ours = MODELS[args.model]()  # the presets' vocabulary is Llama 2's 32000
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=ours.dim, intermediate_size=ours.hidden_dim,
                         num_hidden_layers=ours.n_layers, num_attention_heads=ours.n_heads,
                         num_key_value_heads=ours.n_kv_heads, max_position_embeddings=4096,
                         rms_norm_eps=1e-5, attn_implementation="sdpa")
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=args.device == "cuda")
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    rates, losses = [], []
    for step in range(args.warmup + args.steps):
        tokens = torch.randint(3, 32000, (BATCH, SEQ), device=args.device)
        sync()
        start = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        losses.append(loss.item())
        if step >= args.warmup:
            rates.append(BATCH * SEQ / (time.perf_counter() - start))
    params = sum(p.numel() for p in model.parameters())
    return {"tokens_per_second": statistics.median(rates),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0,
            "loss_first": losses[0], "loss_last": losses[-1],
            "flops_per_token": flops_per_token(params, ours.n_layers, ours.dim)}


def run_phase(phase: str, args, work: Path) -> dict | None:
    out = work / f"{phase}.json"
    base = [f"--phase={phase}", f"--work={work}", f"--steps={args.steps}",
            f"--warmup={args.warmup}", f"--model={args.model}", f"--device={args.device}",
            f"--seq={args.seq}"] + (["--compile"] if args.compile else [])
    if phase == "tune-fsdp":
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                "--master_port", "29533", __file__, *base]
    else:
        argv = [sys.executable, __file__, *base]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(p) for p in sorted((REPO / "packages").glob("*/src"))]
        + [os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True,
                            timeout=args.phase_timeout)
    if result.returncode != 0 or not out.exists():
        print(f"{phase}: FAILED ({result.returncode})\n{result.stderr[-3000:]}", flush=True)
        return None
    data = json.loads(out.read_text())
    data["wall_s"] = time.perf_counter() - start
    return data


def main() -> None:
    global SEQ
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--phases", default="tune,tune-fsdp,hf")
    parser.add_argument("--model", default="llama2_7b",
                        help="preset (llama2_tiny: a CPU smoke run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--phase-timeout", type=int, default=240)
    args = parser.parse_args()
    SEQ = args.seq
    if args.phase:  # a child process: run one phase and write its figures
        work = Path(args.work)
        figures = phase_hf(args, work) if args.phase == "hf" else phase_tune(args, work)
        if int(os.environ.get("RANK", "0")) == 0:
            (work / f"{args.phase}.json").write_text(json.dumps(figures))
        return
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: this check needs one")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {args.model}, batch {BATCH} x {SEQ}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for phase in args.phases.split(","):
            results[phase] = run_phase(phase, args, Path(tmp))
            r = results[phase]
            if r:
                mfu = r["tokens_per_second"] * r["flops_per_token"] / PEAK_FLOPS
                print(f"{phase:10s} {r['tokens_per_second']:>9,.0f} tokens/s  peak "
                      f"{r['peak_gib']:5.1f} GiB  MFU {mfu:5.1%}  loss {r['loss_first']:.3f} -> "
                      f"{r['loss_last']:.3f}  ({r['wall_s']:.0f} s)", flush=True)
    if results.get("tune") and results.get("hf"):
        print(f"ratio tune / transformers tokens/s: "
              f"{results['tune']['tokens_per_second'] / results['hf']['tokens_per_second']:.2f}")


if __name__ == "__main__":
    main()
