"""LoRA and QLoRA: training-step speed against transformers + PEFT, and the memory of a QLoRA
step at 7B/8B shape.

    uv run python benchmarks/lora.py [--rounds 3] [--steps 3]   # CPU tokens/s vs PEFT
    uv run python benchmarks/lora.py --memory [--models llama3_1_8b,llama2_7b,qwen3_8b]
    python3 benchmarks/lora.py --gpu                             # on a GPU machine, one call
    uv run python benchmarks/lora.py --gpu --smoke               # GPU section, tiny, any device

CPU speed: LoRA rank 8 (alpha 16) on q and v of llama2_20m (~20M parameters, Llama-2-shaped),
batch 4 x 512, fp32, AdamW on the adapters, 2 threads. The peer is transformers'
LlamaForCausalLM (sdpa) wrapped by PEFT's get_peft_model with the same rank, alpha, targets
and dropout; both start from the same weights and train on the same tokens (their step-0
losses are printed and must agree). Every measurement is its own process, alternating tune
and PEFT each round; medians (min, max) and the ratio last. Peak memory is torch's CPU
allocator peak over two steps (see benchmarks/model.py).

Memory: one QLoRA training step of the real shape (llama3_1_8b, llama2_7b, qwen3_8b) at batch
1 x 256,
activation checkpointing, fp32 compute, adapters rank 8 on q, v, o, gate, up, down
(torchtune's QLoRA recipe). The model is built by lora_finetune's own code
(tune_ckpt.building.build_model) from a random base: one weight at a time from the meta
device, each quantised to NF4 as it is made, so the full-precision model never exists.
Prints the bytes of the frozen base, the trainable parameters, the optimizer state, the
step time and the process's peak RSS (goal: <= 10 GB).

GPU (--gpu [--models llama3_1_8b,qwen3_8b]): each model's real shape (Llama-3.1-8B;
Qwen3-8B: QK-norm, 152k-token untied output), bf16, batch 2 x 2048, activation
checkpointing, adapters rank 8 on q, v, o, gate, up, down: tune QLoRA, tune LoRA and
transformers + PEFT LoRA (LlamaForCausalLM, Qwen3ForCausalLM; transformers' QLoRA needs
bitsandbytes, which the GPU machine lacks). Needs only python3
with torch and transformers (run from source: PYTHONPATH=$(ls -d packages/*/src | paste -sd:));
without peft the transformers side gets a minimal LoRA layer written here, and says so. Each
measurement is its own process: warm-up steps, then timed steps between
torch.cuda.synchronize() calls; peak memory is torch.cuda.max_memory_allocated().

Last measured (this machine: 2 CPU cores, fp32, torch 2.x CPU build; no GPU lent):
* CPU speed, 5 rounds x 3 steps, quiet machine: tune 3,148 tokens/s median (3,102-3,373),
  transformers + PEFT 2,521 (2,491-2,628): 1.25x (goal >= 1.2x; 1.30x in a 3-round run, 1.38x
  on a loaded machine); peak allocator memory 477 MiB vs 948 MiB (0.50x). Step-0 losses
  equal (10.42452 both), 32,768 trainable parameters on each side.
* Memory, one QLoRA step at 1 x 256: llama3_1_8b peak RSS 9.27 GB (goal <= 10 GB): frozen
  base 7.80 GB (NF4 linears 3.60 GB, fp32 embeddings + output 4.2 GB, kept unquantised as
  bitsandbytes keeps them), 19,660,800 trainable parameters = 78.6 MB, AdamW state
  157.3 MB; built in 300 s, step 200 s. llama2_7b: 5.77 GB peak RSS, frozen base 4.39 GB
  (NF4 linears 3.34 GB), 17,891,328 trainable = 71.6 MB, AdamW 143.1 MB; built in 159 s,
  step 162 s. Before lora_finetune set glibc's mmap threshold for an NF4 base on CPU
  (tune_train.memory.return_large_blocks_to_os) the same steps peaked at 10.74 GB and 7.31 GB:
  the weights dequantised for every matmul fragmented the heap.
* Memory, qwen3_8b (`--memory --models qwen3_8b`, load average 4-5): peak RSS 9.98 GB (goal
  <= 10 GB, met by 20 MB): frozen base 8.56 GB (NF4 linears 3.58 GB; the 152k-token
  embedding and output, not tied, 4.98 GB in fp32), 20,348,928 trainable parameters =
  81.4 MB, AdamW state 162.8 MB; built in 488 s, step 565 s.
* GPU: not run (no GPU was lent to this task); `--gpu --smoke` runs the three sides of each
  model on CPU (tiny Llama-3.1- and Qwen3-shaped models).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "testing"))  # hf_reference: transformers twin of a config

from _timing import median, summary, timed  # noqa: E402

RANK, ALPHA = 8, 16
CPU_TARGETS = ["q", "v"]
# torchtune's QLoRA / LoRA recipes for Llama 3.1 8B: q, v, output projection and the MLP.
BIG_TARGETS = ["q", "v", "o", "gate", "up", "down"]
HF_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
            "up": "up_proj", "down": "down_proj", "output": "lm_head"}


# --- building models without materialising a full-precision one ------------------------------


def build_tune(config, *, qlora: bool, device, dtype, targets, checkpointing: bool):
    """lora_finetune's own build (the one builder, tune_ckpt.building.build_model) from a
    random base: made one weight at a time from the meta device, quantised as it goes under
    QLoRA, so the full-precision model never exists."""
    import torch

    from tune_ckpt.building import RandomBase, build_model
    from tune_models import LoRASettings

    def prepare(model):
        for layer in model.layers:
            layer.use_checkpoint = checkpointing

    device = torch.device(device)
    if qlora and device.type == "cpu":  # as lora_finetune does (tune_train.setup)
        from tune_train.memory import return_large_blocks_to_os

        return_large_blocks_to_os()
    model = build_model(config, lambda m: RandomBase(m, 0, device),
                        lora=LoRASettings(RANK, ALPHA, 0.0, tuple(targets)),
                        quantize="nf4" if qlora else None, device=device, dtype=dtype, seed=0,
                        prepare=prepare)
    return model.train()


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --- CPU: tokens/s against transformers + PEFT ------------------------------------------------


def cpu_child(side: str, steps: int, dropout: float) -> dict:
    import torch
    from hf_reference import hf_and_native
    from model import _peak_allocated_mib
    from torch.profiler import ProfilerActivity, profile

    from tune_models import apply_lora, llama2_20m

    torch.set_num_threads(2)
    config = llama2_20m()
    batch, seq = 4, 512
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        hf, ours = hf_and_native(config, seed=0)
        torch.manual_seed(1)
        tokens = torch.randint(0, config.vocab_size, (batch, seq))
        if side == "tune":
            del hf
            model = apply_lora(ours.train(), rank=RANK, alpha=ALPHA, dropout=dropout,
                               targets=CPU_TARGETS)
            targets = torch.cat([tokens[:, 1:], torch.full((batch, 1), -100)], dim=1)
            n = (targets != -100).sum()

            def loss():
                return model(tokens, labels=targets) / n
        else:
            import peft

            del ours
            lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout,
                                   target_modules=[HF_NAMES[t] for t in CPU_TARGETS],
                                   task_type="CAUSAL_LM")
            model = peft.get_peft_model(hf.train(), lora)

            def loss():
                return model(input_ids=tokens, labels=tokens).loss

        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)

        def step() -> float:
            value = loss()
            value.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return value.item()

        first_loss = step()  # B = 0: the base model's loss, equal on both sides
        step()
    peak = _peak_allocated_mib(prof)
    elapsed = timed(lambda: [step() for _ in range(steps)])
    return {"tokens_per_s": batch * seq * steps / elapsed, "peak_mib": peak,
            "first_loss": first_loss, "trainable": sum(p.numel() for p in trainable)}


def _run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"child {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_bench(rounds: int, steps: int, dropout: float) -> None:
    runs: dict[str, list[dict]] = {"tune": [], "peft": []}
    for _ in range(rounds):
        for side in runs:
            runs[side].append(_run_child(["--cpu-child", side, "--steps", str(steps),
                                          "--dropout", str(dropout)]))
    losses = {side: results[0]["first_loss"] for side, results in runs.items()}
    print(f"LoRA r={RANK} alpha={ALPHA} dropout={dropout} on {','.join(CPU_TARGETS)}, "
          f"llama2_20m, batch 4 x 512, fp32, 2 threads, {steps} steps/round, {rounds} rounds")
    print(f"  step-0 loss: tune {losses['tune']:.5f}, transformers+PEFT {losses['peft']:.5f} "
          f"(same weights and tokens); trainable parameters "
          f"{runs['tune'][0]['trainable']:,} vs {runs['peft'][0]['trainable']:,}")
    if not math.isclose(losses["tune"], losses["peft"], rel_tol=1e-4):
        raise SystemExit("the two sides do not compute the same model: the comparison is void")
    names = {"tune": "tune", "peft": "transformers+PEFT"}
    for side, results in runs.items():
        print(f"  {names[side]:18s} tokens/s {summary([r['tokens_per_s'] for r in results])}")
        print(f"  {'':18s} peak MiB {summary([r['peak_mib'] for r in results], 0)}")
    speed = median([r["tokens_per_s"] for r in runs["tune"]]) / median(
        [r["tokens_per_s"] for r in runs["peft"]])
    memory = median([r["peak_mib"] for r in runs["tune"]]) / median(
        [r["peak_mib"] for r in runs["peft"]])
    print(f"ratio tune / transformers+PEFT: speed {speed:.2f}x (goal >= 1.2x), "
          f"peak memory {memory:.2f}x")


# --- memory of one QLoRA step at the real shape (CPU) ------------------------------------------


def memory_child(name: str, batch: int, seq: int) -> dict:
    import torch

    from tune_models import MODELS

    torch.set_num_threads(2)
    config = MODELS[name]()
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_tune(config, qlora=True, device="cpu", dtype=torch.float32,
                       targets=BIG_TARGETS, checkpointing=True)
    build_s = time.perf_counter() - start
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    nf4 = [p for n, p in model.named_parameters() if "_nf4" in n]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    tokens = torch.randint(0, config.vocab_size, (batch, seq))
    labels = torch.randint(0, config.vocab_size, (batch, seq))
    start = time.perf_counter()
    (model(tokens, labels=labels) / labels.numel()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - start
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {"frozen_bytes": _bytes(frozen), "nf4_bytes": _bytes(nf4),
            "trainable_bytes": _bytes(trainable), "trainable": sum(p.numel() for p in trainable),
            "optimizer_bytes": _bytes(state), "build_s": build_s, "step_s": step_s,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def memory_bench(names: list[str], batch: int, seq: int) -> None:
    print(f"One QLoRA step, batch {batch} x {seq}, fp32 compute, activation checkpointing, "
          f"adapters r={RANK} on {','.join(BIG_TARGETS)}, random NF4 base, CPU")
    for name in names:
        r = _run_child(["--memory-child", name, "--batch", str(batch), "--seq", str(seq)])
        gb = 1e9
        print(f"  {name}: frozen base {r['frozen_bytes'] / gb:.2f} GB (NF4 linears "
              f"{r['nf4_bytes'] / gb:.2f} GB; embeddings, norms, output in fp32 the rest), "
              f"trainable {r['trainable']:,} parameters = {r['trainable_bytes'] / 1e6:.1f} MB, "
              f"optimizer state {r['optimizer_bytes'] / 1e6:.1f} MB")
        print(f"  {name}: built in {r['build_s']:.0f} s, step {r['step_s']:.0f} s, peak RSS "
              f"{r['peak_rss_bytes'] / gb:.2f} GB (goal <= 10 GB)", flush=True)


# --- GPU: 8B-shaped QLoRA and LoRA, bf16 -------------------------------------------------------


def _hf_lora(model, targets, use_peft: bool):
    """transformers' model with LoRA adapters on ``targets``: PEFT's, or (without peft) a
    minimal LoRA layer of the same math, so the base model's cost is what is compared."""
    import torch
    from torch import nn

    if use_peft:
        import peft

        lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM",
                               target_modules=[HF_NAMES[t] for t in targets])
        return peft.get_peft_model(model, lora)

    class HandLoRA(nn.Module):
        def __init__(self, base: nn.Linear):
            super().__init__()
            self.base = base
            self.a = nn.Parameter(torch.empty(RANK, base.in_features, device=base.weight.device,
                                              dtype=base.weight.dtype))
            self.b = nn.Parameter(torch.zeros(base.out_features, RANK, device=base.weight.device,
                                              dtype=base.weight.dtype))
            nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))

        def forward(self, x):
            return self.base(x) + (x @ self.a.T) @ self.b.T * (ALPHA / RANK)

    model.requires_grad_(False)
    wanted = {HF_NAMES[t] for t in targets}
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in wanted:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, HandLoRA(module))
    return model


# The transformers architecture each GPU model is compared with (hf_reference.hf_config's).
GPU_ARCHITECTURES = {"llama3_1_8b": "llama", "qwen3_8b": "qwen3"}
# Peak GiB goals: the bf16 (LoRA) or NF4 + bf16 (QLoRA) weights plus the headroom Llama-3.1-8B
# was given (activations at 2 x 2048 with checkpointing, the chunked loss, the allocator).
GPU_GOALS = {("llama3_1_8b", "tune_qlora"): 7.4, ("llama3_1_8b", "tune_lora"): 16.2,
             ("qwen3_8b", "tune_qlora"): 7.8, ("qwen3_8b", "tune_lora"): 16.5}


def _gpu_config(name: str, smoke: bool):
    """The model's real shape, or (smoke) a tiny one of the same family (CPU is fine)."""
    import dataclasses

    from tune_models import MODELS, DecoderConfig, llama3_1_8b, qwen3_tiny

    if not smoke:
        return MODELS[name]()
    if name == "qwen3_8b":  # QK-norm, heads wider than dim / n_heads, untied output
        return dataclasses.replace(qwen3_tiny(512), tie_embeddings=False, max_seq_len=256)
    return DecoderConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                         hidden_dim=448, max_seq_len=256, rope_theta=500000.0,
                         rope_scaling=llama3_1_8b().rope_scaling)


def gpu_child(side: str, name: str, smoke: bool, steps: int) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = _gpu_config(name, smoke)
    batch, seq, warmup = (2, 128, 1) if smoke else (2, 2048, 2)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    note = ""
    if side.startswith("tune"):
        model = build_tune(config, qlora=side == "tune_qlora", device=device, dtype=dtype,
                           targets=BIG_TARGETS, checkpointing=True)
        labels = torch.cat([tokens[:, 1:], torch.full((batch, 1), -100, device=device)], dim=1)
        n = (labels != -100).sum()

        def loss():
            return model(tokens, labels=labels) / n
    else:
        import transformers
        from hf_reference import hf_config

        architecture = GPU_ARCHITECTURES[name]
        model_class = {"llama": transformers.LlamaForCausalLM,
                       "qwen3": transformers.Qwen3ForCausalLM}[architecture]
        with torch.device("meta"):  # meta: free
            model = model_class(hf_config(config, architecture, dtype=dtype)).to(dtype)
        model.to_empty(device=device)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02)
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            import peft  # noqa: F401

            use_peft = True
        except ImportError:
            use_peft, note = False, "peft is not installed: transformers with a minimal LoRA layer"
        model = _hf_lora(model, BIG_TARGETS, use_peft).train()

        def loss():
            return model(input_ids=tokens, labels=tokens).loss

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    def step():
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    return {"tokens_per_s": batch * seq * steps / elapsed, "peak_gib": peak / 2**30,
            "trainable": sum(p.numel() for p in trainable), "device": device, "note": note}


def gpu_bench(names: list[str], smoke: bool, steps: int) -> None:
    # transformers' QLoRA needs bitsandbytes' kernels and a checkpoint to quantise while
    # loading; the peer here is its bf16 LoRA path, which QLoRA should not fall far behind.
    sides = ["tune_qlora", "hf_lora", "tune_lora"]
    for name in names:
        if name not in GPU_ARCHITECTURES:
            raise SystemExit(f"--gpu covers {', '.join(GPU_ARCHITECTURES)}, not {name}")
        results = {}
        for side in sides:
            args = ["--gpu-child", side, "--model", name, "--steps", str(steps)] + (
                ["--smoke"] if smoke else [])
            try:
                results[side] = _run_child(args)
            except SystemExit as e:  # one failing peer must not hide the others' figures
                print(f"{name} {side}: failed: {str(e)[-600:]}")
                continue
            r = results[side]
            print(f"{name} {side:11s} {r['tokens_per_s']:10,.0f} tokens/s  peak "
                  f"{r['peak_gib']:6.2f} GiB  trainable {r['trainable']:,} ({r['device']}) "
                  f"{r['note']}", flush=True)
        for side in sides:
            goal = GPU_GOALS.get((name, side))
            if goal is not None and side in results and not smoke:
                print(f"{name} {side}: peak {results[side]['peak_gib']:.2f} GiB "
                      f"(goal <= {goal} GiB)")
        for ours, peer in (("tune_lora", "hf_lora"), ("tune_qlora", "hf_lora")):
            if ours in results and peer in results:
                ratio = results[ours]["tokens_per_s"] / results[peer]["tokens_per_s"]
                print(f"{name} ratio {ours} / {peer}: tokens/s {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per measurement (CPU 3, GPU 5, smoke 2)")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--memory", action="store_true", help="the 7B/8B QLoRA memory section")
    parser.add_argument("--models", default=None,
                        help="--memory: llama3_1_8b,llama2_7b,qwen3_8b; --gpu: "
                        "llama3_1_8b,qwen3_8b")
    parser.add_argument("--model", help=argparse.SUPPRESS)  # a GPU child's model
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--gpu", action="store_true", help="the GPU section")
    parser.add_argument("--smoke", action="store_true", help="GPU section on tiny shapes")
    parser.add_argument("--cpu-child", help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--gpu-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_child:
        print(json.dumps(cpu_child(args.cpu_child, args.steps or 3, args.dropout)))
    elif args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.batch, args.seq)))
    elif args.gpu_child:
        print(json.dumps(gpu_child(args.gpu_child, args.model, args.smoke, args.steps or 5)))
    elif args.memory:
        memory_bench((args.models or "llama3_1_8b,llama2_7b,qwen3_8b").split(","), args.batch,
                     args.seq)
    elif args.gpu:
        gpu_bench((args.models or ",".join(GPU_ARCHITECTURES)).split(","), args.smoke,
                  args.steps or (2 if args.smoke else 5))
    else:
        cpu_bench(args.rounds, args.steps or 3, args.dropout)


if __name__ == "__main__":
    main()
