"""kill -9 a real training process at random steps and in the middle of checkpoint writes;
resuming must reproduce the uninterrupted losses (training and validation, at the same
steps) and best checkpoint bit for bit, and no kill may leave an unloadable latest or best
checkpoint."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tune_train.checkpointing import (
    checkpoint_root,
    latest_checkpoint,
    read_best_info,
)
from tune_train.metrics import read_jsonl_metrics
from tune_train.state import TrainingState

from train_helpers import tiny_config

STEPS = 12


def _config(tiny_run, output_dir: Path, **extra) -> Path:
    # A slightly wider model than llama2_tiny so a checkpoint write takes long enough to be
    # hit by a kill; the checkpoint every 3 steps keeps the test quick. Validation every 2
    # steps falls between checkpoints, so a resume must find its schedule from the step.
    cfg = tiny_run(output_dir=str(output_dir), max_steps_per_epoch=STEPS, save_every_n_steps=3,
                   keep_last_n_checkpoints=2, lr_scheduler="cosine", warmup_steps=2,
                   model_args={"dim": 256, "n_heads": 4, "n_kv_heads": 2},
                   validation_split=0.05, eval_every_n_steps=2, save_best=True, **extra)
    path = output_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(config: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tune_train.recipes.full_finetune", "--config", str(config),
         *overrides],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )


def _losses(output_dir: Path) -> dict[int, tuple[float, float | None]]:
    """Training and validation loss by step, and the best checkpoint's record."""
    records = read_jsonl_metrics(output_dir / "metrics.jsonl")
    return {r["step"]: (r["loss"], r.get("val_loss")) for r in records} | {
        "best": read_best_info(output_dir)}


def _steps_logged(output_dir: Path) -> int:
    path = output_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _finish(proc: subprocess.Popen, timeout: float = 120) -> None:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()[-2000:]


def _assert_latest_loads(output_dir: Path) -> None:
    # best is whole, or (killed between its two renames) whole under the name the next
    # start puts back.
    root = checkpoint_root(output_dir)
    for best in (root / "best", root / ".old-best"):
        if best.is_dir():
            assert "output.weight" in torch.load(best / "native_pytorch_model.pt",
                                                 weights_only=True, mmap=True)
    latest = latest_checkpoint(output_dir)
    if latest is None:
        return
    state = TrainingState.read(latest)
    weights = torch.load(latest / "native_pytorch_model.pt", weights_only=True, mmap=True)
    assert state.global_step >= 1 and "output.weight" in weights
    assert (latest / "training_state" / ".metadata").is_file()


@pytest.fixture(scope="module")
def reference(tiny_run_module):
    """Losses of the uninterrupted run."""
    tiny_run, root = tiny_run_module
    out = root / "reference"
    _finish(_start(_config(tiny_run, out)))
    losses = _losses(out)
    assert sorted(k for k in losses if k != "best") == list(range(1, STEPS + 1))
    assert [s for s in range(1, STEPS + 1) if losses[s][1] is not None] == list(
        range(2, STEPS + 1, 2))
    assert losses["best"] is not None
    return losses


@pytest.fixture(scope="module")
def tiny_run_module(demo_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")

    return (lambda **extra: tiny_config(demo_files, **extra)), root


def test_kill_at_random_steps_then_resume(reference, tiny_run_module):
    tiny_run, root = tiny_run_module
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    out = root / f"steps-{seed}"
    config = _config(tiny_run, out)
    for _ in range(2):  # two kills in one run, then a resume to the end
        proc = _start(config, "resume_from_checkpoint=True")
        target = min(_steps_logged(out) + rng.randint(1, 4), STEPS - 1)
        deadline = time.monotonic() + 120
        while _steps_logged(out) < target and proc.poll() is None:
            assert time.monotonic() < deadline, "training made no progress"
            time.sleep(0.005)
        time.sleep(rng.random() * 0.2)  # somewhere inside the next step
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _assert_latest_loads(out)
    _finish(_start(config, "resume_from_checkpoint=True"))
    assert _losses(out) == reference, f"seed {seed}"


def test_kill_inside_checkpoint_writes_then_resume(reference, tiny_run_module):
    tiny_run, root = tiny_run_module
    out = root / "writes"
    config = _config(tiny_run, out)
    staging = out / "checkpoints"
    hits = 0
    # The best model's folder first (its first write comes before the first checkpoint's),
    # then a checkpoint's, then whichever comes.
    for prefix in (".tmp-best", ".tmp-step", ".tmp-"):
        proc = _start(config, "resume_from_checkpoint=True")
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if staging.is_dir() and any(p.name.startswith(prefix) for p in staging.iterdir()):
                proc.send_signal(signal.SIGKILL)  # a checkpoint is half written right now
                hits += 1
                break
            time.sleep(0.0005)
        proc.wait()
        _assert_latest_loads(out)
        if proc.returncode == 0:
            break
    assert hits >= 1, "never caught a checkpoint write in progress"
    _finish(_start(config, "resume_from_checkpoint=True"))
    assert _losses(out) == reference
    assert not any(p.name.startswith(".tmp-") for p in staging.iterdir())
