"""The tutorial, walked as a user would: every step a `tune` subprocess, the hub a local
server, training two real torchrun processes on the real Alpaca records."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import yaml

from tune_train.metrics import read_jsonl_metrics

TUNE = str(Path(sys.executable).with_name("tune"))


def tune(*args: str, cwd: Path, env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([TUNE, *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)
    if ok:
        assert result.returncode == 0, f"tune {' '.join(args)}\n{result.stderr[-3000:]}"
    return result


def test_tutorial_end_to_end(tiny_meta_repo, alpaca_json_path, tmp_path):
    env = tiny_meta_repo.server.env()
    home = tmp_path / "work"
    home.mkdir()
    download_dir = tmp_path / "llama2"

    # 1. The repo is gated: without a token the user is told what to do, in one line.
    denied = tune("download", "meta-llama/Llama-2-7b", "--output-dir", str(download_dir),
                  cwd=home, env=env, ok=False)
    assert denied.returncode == 1
    assert "request access" in denied.stderr and "Traceback" not in denied.stderr
    assert [line for line in denied.stderr.splitlines() if "error" in line.lower()] == [
        next(line for line in denied.stderr.splitlines() if line.startswith("error:"))]

    # 2. With the token (the tutorial's spelling of the options); it is never echoed.
    got = tune("download", "--repo_id", "meta-llama/Llama-2-7b", "--hf-token",
               tiny_meta_repo.token, "--output_dir", str(download_dir), cwd=home, env=env)
    assert tiny_meta_repo.token not in got.stdout + got.stderr
    for name in ("consolidated.00.pth", "params.json", "tokenizer.model"):
        assert (download_dir / name).is_file()

    # 3. Convert: native_pytorch_model.pt lands beside the Meta checkpoint.
    tune("convert_checkpoint", "--checkpoint_path", str(download_dir / "consolidated.00.pth"),
         cwd=home, env=env)
    native = download_dir / "native_pytorch_model.pt"
    assert native.is_file()

    # 4. Copy the tutorial's config and edit it for this machine.
    tune("config", "cp", "alpaca_llama2_full_finetune", "custom_alpaca_llama2_full_finetune",
         cwd=home, env=env)
    config_path = home / "custom_alpaca_llama2_full_finetune.yaml"
    cfg = yaml.safe_load(config_path.read_text())
    output_dir = tmp_path / "alpaca-llama2-finetune"
    cfg.update(
        model="llama2_tiny", model_checkpoint=str(native),
        tokenizer_checkpoint=str(download_dir / "tokenizer.model"),
        data_files=str(alpaca_json_path), output_dir=str(output_dir), device="cpu",
        dtype="fp32", optimizer="AdamW", lr=2e-3, epochs=1, max_steps_per_epoch=16,
        max_seq_len=128, packing=True, batch_size=2,
    )
    config_path.write_text(yaml.safe_dump(cfg))
    tune("config", "validate", str(config_path), cwd=home, env=env)

    # 5. Two processes under torchrun, FSDP and activation checkpointing as configured.
    train = tune("--nnodes", "1", "--nproc_per_node", "2", "full_finetune.py", "--config",
                 str(config_path), cwd=home, env=env)
    assert "epoch 1 done" in train.stdout + train.stderr
    losses = [r["loss"] for r in read_jsonl_metrics(output_dir / "metrics.jsonl")]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses
    checkpoint = next((output_dir / "checkpoints").glob("step_*")) / "native_pytorch_model.pt"
    assert checkpoint.is_file()

    # 6. Generate from the fine-tuned model (tokenizer found through the run's config).
    generated = tune("generate", "--checkpoint", str(output_dir), "--template", "alpaca",
                     "--prompt", "Give three tips for staying healthy.", "--max-new-tokens",
                     "8", cwd=home, env=env)
    assert generated.stdout.strip()
    assert "tokens/s" in generated.stderr

    # 7. The loss curve as a picture.
    plotted = tune("plot", str(output_dir), cwd=home, env=env)
    png = output_dir / "loss_curve.png"
    assert str(png) in plotted.stdout
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 400 and height >= 300

    # The run's own record of what it did.
    assert json.loads((checkpoint.parent / "trainer_state.json").read_text())["world_size"] == 2
