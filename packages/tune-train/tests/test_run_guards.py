"""A run refuses what would silently go wrong: a second run on its output_dir, an output_dir
it cannot use, numbers that stopped being finite. Each gets one line that says what to do."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tune_train import metrics
from tune_train.checkpointing import latest_checkpoint, list_checkpoints
from tune_train.config import load_config
from tune_train.errors import RecipeError
from tune_train.metrics import read_jsonl_metrics
from tune_train.recipes import recipe_main_of

from train_helpers import run_recipe, started_run

main = recipe_main_of("full_finetune")


def _records(output_dir: str | Path) -> list[dict]:
    return read_jsonl_metrics(Path(output_dir) / "metrics.jsonl")


# ----------------------------------------------------------------------------- output_dir
def test_a_second_run_on_a_held_output_dir_fails_naming_the_holder(tiny_run):
    with started_run(tiny_run()):  # holds output_dir until the block ends
        with pytest.raises(RecipeError) as e:
            run_recipe(tiny_run())
        assert str(e.value) == (
            f"output_dir {tiny_run()['output_dir']} is in use by another training run (pid "
            f"{os.getpid()} on {socket.gethostname()}); wait for it to finish, or set another "
            "output_dir")
    # Released at the end of the run: the next one may continue it.
    run_recipe(tiny_run(resume_from_checkpoint=True))


def test_output_dir_that_is_a_file(tiny_run, tmp_path):
    path = tmp_path / "results"
    path.write_text("my notes\n")
    with pytest.raises(RecipeError, match=f"^output_dir {path} is a file, not a folder; set "
                                          "output_dir to a folder"):
        main(load_config(tiny_run(output_dir=str(path))))
    assert path.read_text() == "my notes\n"
    with pytest.raises(RecipeError, match=f"^output_dir {path / 'run'} cannot be created: "
                                          f"{path} is a file, not a folder"):
        main(load_config(tiny_run(output_dir=str(path / "run"))))


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10


@contextmanager
def unwritable(folder: Path):
    """folder made unwritable, for root too: permission bits do not stop root, so as root
    the folder is marked immutable (``chattr +i``), which does."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("i", 0)))[0]
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags | FS_IMMUTABLE_FL))
    except OSError as e:
        os.close(fd)
        pytest.skip(f"running as root, whom only an immutable folder stops, and the file "
                    f"system of {folder} cannot mark one ({e.strerror})")
    try:
        yield
    finally:
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags))
        os.close(fd)


def test_read_only_output_dir(tiny_run, tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    with unwritable(existing):
        with pytest.raises(RecipeError, match=f"^output_dir {existing} is not writable "
                                              r"\(.+\); set output_dir to a folder you can "
                                              "write to"):
            main(load_config(tiny_run(output_dir=str(existing))))
    parent = tmp_path / "parent"
    parent.mkdir()
    with unwritable(parent):
        with pytest.raises(RecipeError, match=f"^cannot create output_dir {parent / 'run'} "
                                              r"\(.+\); set output_dir to a folder you can"):
            main(load_config(tiny_run(output_dir=str(parent / "run"))))
    assert list(existing.iterdir()) == [] and list(parent.iterdir()) == []


# ----------------------------------------------------------------------------- non-finite
def test_a_non_finite_loss_stops_the_run_naming_the_step(tiny_run):
    # lr 1e30: the first update makes the weights ~1e30, and step 2's forward overflows.
    with pytest.raises(RecipeError) as e:
        run_recipe(tiny_run(lr=1e30, max_steps_per_epoch=4))
    assert str(e.value).startswith("training diverged at step 2: the loss is nan; no "
                                   "checkpoint was written. Lower lr (now 1e+30)")
    assert [r["step"] for r in _records(tiny_run()["output_dir"])] == [1]
    assert list_checkpoints(tiny_run()["output_dir"]) == []


def test_a_non_finite_gradient_norm_stops_the_run_naming_the_step(tiny_run):
    # Plain SGD with lr 1e11 and no clipping: weights ~1e9 after step 1 still give a finite
    # loss at step 2, but its gradient overflows (lr 1e9 trains on, 1e13 overflows the loss).
    with pytest.raises(RecipeError, match="^training diverged at step 2: the gradient norm "
                                          "is (nan|inf); no checkpoint was written"):
        run_recipe(tiny_run(optimizer="SGD", lr=1e11, max_grad_norm=None, max_steps_per_epoch=4))


def test_weights_made_non_finite_are_never_checkpointed(tiny_run):
    """The last good checkpoint stays the latest and loads; nothing of the bad step is on
    disk."""
    # SGD's weight decay shrinks each weight by lr * weight_decay per step: a tenth here.
    common = dict(optimizer="SGD", weight_decay=1e30, max_steps_per_epoch=2,
                  save_every_n_steps=1)
    run_recipe(tiny_run(**common, lr=1e-31))
    out = tiny_run()["output_dir"]
    good = latest_checkpoint(out)
    assert good.name == "step_0000002"
    # Resumed at lr 1e30, one update scales every weight by about -1e60, past the largest
    # float, although that step's loss and gradient norm were finite.
    with pytest.raises(RecipeError) as e:
        run_recipe(tiny_run(**common, lr=1e30, epochs=2, resume_from_checkpoint=True))
    assert str(e.value).startswith(
        f"training diverged at step 3: its update made some weights inf or nan; the latest "
        f"checkpoint, {good}, is unchanged.")
    assert latest_checkpoint(out) == good
    assert [p.name for p in list_checkpoints(out)] == ["step_0000001", "step_0000002"]
    assert not list(Path(out, "checkpoints").glob(".tmp-*"))
    state = torch.load(good / "native_pytorch_model.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state.values())


def test_fp16_loss_scaler_still_skips_overflowing_steps(tiny_run, monkeypatch):
    """Overflowing fp16 gradients are the loss scaler's business (skip the step, halve the
    scale), not divergence: the run goes on and finishes."""
    from tune_train.optim import DynamicLossScaler

    monkeypatch.setattr(DynamicLossScaler, "init_scale", 2.0**24)  # scaled gradients overflow
    cfg = run_recipe(tiny_run(dtype="fp16", max_seq_len=16, batch_size=2, max_steps_per_epoch=12))
    records = _records(cfg.output_dir)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[0]["skipped_step"] == 1.0 and records[0]["loss_scale"] == 2.0**23
    assert records[-1]["skipped_step"] == 0.0
    assert latest_checkpoint(cfg.output_dir).name == "step_0000012"


# ----------------------------------------------------------------------------- progress
def test_plain_progress_lines_when_stderr_is_not_a_terminal(tiny_run, capsys, monkeypatch):
    # Under pytest stderr is a pipe, as in `tune run ... > train.log 2>&1`.
    monkeypatch.setattr(metrics, "PLAIN_PROGRESS_SECONDS", 0.0)
    run_recipe(tiny_run(max_steps_per_epoch=3, metric_loggers=["stdout"]))
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err
    lines = captured.out.splitlines()
    assert [line.split(" |")[0] for line in lines if line.startswith("step ")] == [
        "step 1", "step 2", "step 3"]
    progress = [line for line in lines if line.startswith("epoch 1/1: step ")]
    assert [p.split(" (")[0] for p in progress] == [
        "epoch 1/1: step 1/3", "epoch 1/1: step 2/3", "epoch 1/1: step 3/3"]
    assert "loss=" in progress[0] and "left" in progress[0]


def test_no_progress_line_before_the_interval(tiny_run, capsys):
    run_recipe(tiny_run(max_steps_per_epoch=3, metric_loggers=["stdout"]))
    out = capsys.readouterr().out
    assert "step 3 |" in out and "epoch 1/1: step" not in out
