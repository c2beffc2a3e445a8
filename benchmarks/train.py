"""One epoch of Alpaca with a ~20M-parameter Llama 2 on CPU: tune vs torchtune 0.6.1.

    uv run python benchmarks/train.py [--rounds 3] [--samples N]

Both start from the same weights (ours saved natively, torchtune's as a Meta checkpoint), read
the same alpaca_5000.json with the same tokenizer, batch 8, max_seq_len 512, AdamW, fp32,
2 threads, one epoch, and save a checkpoint at the end. Each run is a whole process (start-up
and data preparation included), alternating tune and torchtune. tune uses its levers: packing
(no padding) and the fused cross-entropy that skips prompt tokens; torchtune runs its
full_finetune_single_device recipe as shipped. Prints wall times, non-padding tokens/s, the
final losses, and the wall-time ratio last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from _timing import median, summary

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("TUNE_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
TORCHTUNE_VENV = Path(os.environ.get("TORCHTUNE_VENV", HERE / ".venv-torchtune"))


def make_checkpoints(work: Path) -> tuple[Path, Path]:
    from tune_ckpt import native_to_meta, save_native
    from tune_models import Decoder, llama2_20m

    torch.manual_seed(0)
    config = llama2_20m()
    model = Decoder(config)
    model.init_weights()
    native = work / "native" / "native_pytorch_model.pt"
    native.parent.mkdir(parents=True)
    save_native(model.state_dict(), native, model_args=vars(config))
    meta_dir = work / "meta"
    meta_dir.mkdir()
    meta = native_to_meta(model.state_dict(), n_heads=config.n_heads, n_kv_heads=config.n_kv_heads)
    torch.save(meta, meta_dir / "consolidated.00.pth")
    (meta_dir / "params.json").write_text(json.dumps({
        "dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
        "multiple_of": config.multiple_of, "norm_eps": config.norm_eps, "vocab_size": -1}))
    return native, meta_dir


def tune_config(work: Path, native: Path, data: Path, tokenizer: Path, lever: str) -> Path:
    cfg = {
        "dataset": "alpaca", "data_files": str(data), "model": "llama2_20m",
        "model_checkpoint": str(native), "tokenizer_checkpoint": str(tokenizer),
        "batch_size": 8, "max_seq_len": 512, "epochs": 1, "optimizer": "AdamW", "lr": 2e-5,
        "device": "cpu", "dtype": "fp32", "seed": 0, "shuffle": True,
        # packing: rows of 512 tokens (fewer, fuller steps); group_by_length: 8 samples per
        # step like torchtune, batched with others of similar length.
        "packing": lever == "packing", "group_by_length": lever == "group_by_length",
        "metric_loggers": ["jsonl"], "plot": False, "max_grad_norm": None,
        "output_dir": str(work / f"tune-{lever}"),
    }
    path = work / f"tune-{lever}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchtune_config(work: Path, meta_dir: Path, data: Path, tokenizer: Path) -> Path:
    from tune_models import llama2_20m

    c = llama2_20m()
    cfg = {
        "output_dir": str(work / "torchtune-out"),
        "tokenizer": {"_component_": "torchtune.models.llama2.llama2_tokenizer",
                      "path": str(tokenizer), "max_seq_len": 512},
        # torchtune's alpaca_dataset trains on the prompt by default; ours does not. Same task
        # on both sides: loss on the response only.
        "dataset": {"_component_": "torchtune.datasets.alpaca_dataset", "source": "json",
                    "data_files": str(data), "split": "train", "packed": False,
                    "train_on_input": False},
        "seed": 0, "shuffle": True,
        "model": {"_component_": "torchtune.models.llama2.llama2", "vocab_size": c.vocab_size,
                  "num_layers": c.n_layers, "num_heads": c.n_heads, "num_kv_heads": c.n_kv_heads,
                  "embed_dim": c.dim, "intermediate_dim": c.hidden_dim,
                  "max_seq_len": c.max_seq_len, "norm_eps": c.norm_eps},
        "checkpointer": {"_component_": "torchtune.training.FullModelMetaCheckpointer",
                         "checkpoint_dir": str(meta_dir),
                         "checkpoint_files": ["consolidated.00.pth"],
                         "output_dir": str(work / "torchtune-out"), "model_type": "LLAMA2"},
        "resume_from_checkpoint": False,
        "batch_size": 8, "epochs": 1,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 2e-5, "fused": False},
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
        "max_steps_per_epoch": None, "gradient_accumulation_steps": 1, "clip_grad_norm": None,
        "optimizer_in_bwd": False, "compile": False, "device": "cpu", "dtype": "fp32",
        "enable_activation_checkpointing": False, "enable_activation_offloading": False,
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger",
                          "log_dir": str(work / "torchtune-out" / "logs")},
        "log_every_n_steps": 1, "log_peak_memory_stats": False,
        "profiler": {"_component_": "torchtune.training.setup_torch_profiler", "enabled": False},
    }
    path = work / "torchtune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(argv: list[str], out_dir: Path) -> float:
    subprocess.run(["rm", "-rf", str(out_dir)], check=True)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{argv[0]} failed:\n{result.stderr[-4000:]}")
    return elapsed


def real_tokens(data: Path, tokenizer: Path) -> int:
    """Non-padding tokens of the epoch (same data and template on both sides)."""
    from tune_data import SentencePieceTokenizer, alpaca_dataset

    ds = alpaca_dataset(SentencePieceTokenizer(tokenizer), data_files=str(data), max_seq_len=512)
    return int(ds.lengths.sum())


def last_losses(work: Path, name: str) -> float:
    """Mean loss of the last 10 steps of a run."""
    if name == "torchtune":
        logs = sorted((work / "torchtune-out" / "logs").glob("*.txt"))
        values = [float(part.split(":")[1]) for line in logs[-1].read_text().splitlines()
                  for part in line.split() if part.startswith("loss:")]
    else:
        values = [json.loads(line)["loss"] for line in (work / name / "metrics.jsonl").open()]
    return sum(values[-10:]) / len(values[-10:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=None, help="use the first N records")
    args = parser.parse_args()
    tt_python = TORCHTUNE_VENV / "bin" / "python"
    if not tt_python.exists():
        sys.exit(f"torchtune peer missing at {TORCHTUNE_VENV}: run benchmarks/setup_peers.sh")
    tokenizer = SHARED / "llama2-tokenizer" / "tokenizer.model"
    data = SHARED / "alpaca" / "alpaca_5000.json"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.samples:
            subset = work / "alpaca_subset.json"
            subset.write_text(json.dumps(json.loads(data.read_text())[: args.samples]))
            data = subset
        native, meta_dir = make_checkpoints(work)
        tune = str(Path(sys.executable).with_name("tune"))
        commands = {
            f"tune-{lever}": [tune, "run", "full_finetune", "--config",
                              str(tune_config(work, native, data, tokenizer, lever))]
            for lever in ("group_by_length", "packing")
        }
        commands["torchtune"] = [
            str(TORCHTUNE_VENV / "bin" / "tune"), "run", "full_finetune_single_device",
            "--config", str(torchtune_config(work, meta_dir, data, tokenizer))]
        tokens = real_tokens(data, tokenizer)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for i in range(args.rounds):
            for name, argv in commands.items():
                out = work / ("torchtune-out" if name == "torchtune" else name)
                times[name].append(run(argv, out))
            print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()),
                  flush=True)
        losses = {name: last_losses(work, name) for name in commands}
        n = len(json.loads(data.read_text()))
    print(f"one epoch of {n:,} Alpaca records ({tokens:,} non-padding tokens), llama2_20m, "
          "CPU fp32, batch 8, max_seq_len 512:")
    for name, values in times.items():
        print(f"  {name:22s} wall s {summary(values)}; non-padding tokens/s "
              f"{tokens / median(values):,.0f}; mean loss of its last 10 steps "
              f"{losses[name]:.3f}")
    base = median(times["torchtune"])
    print(f"  ratio wall time tune (packing) / torchtune: "
          f"{median(times['tune-packing']) / base:.2f}")
    print(f"  ratio wall time tune (group_by_length, same steps) / torchtune: "
          f"{median(times['tune-group_by_length']) / base:.2f}")


if __name__ == "__main__":
    main()
