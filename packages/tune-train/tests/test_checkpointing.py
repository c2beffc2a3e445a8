"""The checkpoint reader's contract with torch.distributed.checkpoint (DCP).

Resume reads DCP's metadata pickle with its own restricted unpickler and replaces
FileSystemReader.read_metadata; both lean on what torch pickles and on what that method does.
These tests save real DCP checkpoints with the installed torch and fail loudly when a torch
release changes either (STYLE.md #18)."""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn

from tune_train import checkpointing as ckpt


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 8), nn.LayerNorm(8)).to(dtype)


def _trained(optimizer_cls, dtype: torch.dtype, **kwargs):
    model = _model(dtype)
    optimizer = optimizer_cls(model.parameters(), lr=0.1, **kwargs)
    model(torch.arange(4)).float().pow(2).sum().backward()
    optimizer.step()
    return model, optimizer


OPTIMIZERS = {
    "SGD+momentum": (torch.optim.SGD, {"momentum": 0.9}),
    "Adam": (torch.optim.Adam, {}),
    "AdamW": (torch.optim.AdamW, {"betas": (0.8, 0.95), "weight_decay": 0.1}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_restricted_reader_reads_what_torch_writes_and_what_torch_reads(tmp_path, name, dtype):
    from torch.distributed.checkpoint import FileSystemReader

    optimizer_cls, kwargs = OPTIMIZERS[name]
    model, optimizer = _trained(optimizer_cls, dtype, **kwargs)
    path = tmp_path / ckpt.TRAINING_STATE
    ckpt.save_optimizer_state(path, model, optimizer)
    assert (path / ckpt.DCP_METADATA).is_file(), "DCP no longer names its metadata .metadata"

    ours = ckpt._safe_reader(path)
    theirs = FileSystemReader(path)
    ours.load_id = theirs.load_id = "same"
    # Every global in torch's pickle is admitted, and the replaced read_metadata returns what
    # torch's own would (including the storage_meta it fills in).
    assert ours.read_metadata() == theirs.read_metadata()

    fresh_model = _model(dtype)
    fresh = optimizer_cls(fresh_model.parameters(), lr=0.5, **kwargs)  # no state, another lr
    ckpt.load_optimizer_state(path, fresh_model, fresh)
    expected, loaded = optimizer.state_dict(), fresh.state_dict()
    assert loaded["state"].keys() == expected["state"].keys()
    for index, state in expected["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(loaded["state"][index][key], value, rtol=0, atol=0)
    assert loaded["param_groups"][0]["lr"] == 0.1


def test_resuming_keeps_the_configured_hyperparameters_not_the_checkpoints(tmp_path):
    # A user who lowers weight_decay (or changes betas) before resuming gets the new values.
    model, optimizer = _trained(torch.optim.AdamW, torch.float32, weight_decay=0.1)
    path = tmp_path / ckpt.TRAINING_STATE
    ckpt.save_optimizer_state(path, model, optimizer)
    fresh_model = _model(torch.float32)
    fresh = torch.optim.AdamW(fresh_model.parameters(), lr=0.1, weight_decay=0.0,
                              betas=(0.8, 0.9))
    ckpt.load_optimizer_state(path, fresh_model, fresh)
    group = fresh.param_groups[0]
    assert (group["weight_decay"], group["betas"]) == (0.0, (0.8, 0.9))
    assert fresh.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_metadata_that_names_anything_else_is_refused_without_running_it(tmp_path):
    model, optimizer = _trained(torch.optim.AdamW, torch.float32)
    path = tmp_path / ckpt.TRAINING_STATE
    ckpt.save_optimizer_state(path, model, optimizer)
    metadata = pickle.loads((path / ckpt.DCP_METADATA).read_bytes())
    marker = tmp_path / "ran"
    metadata.storage_meta.modules = [_RunsCode(str(marker))]  # hidden deep inside real metadata
    (path / ckpt.DCP_METADATA).write_bytes(pickle.dumps(metadata))
    with pytest.raises(ckpt.DamagedCheckpointError,
                       match=r"refusing to load training_state/.metadata: it asks for "
                             r"posix.mkdir, which is not checkpoint metadata"):
        ckpt.load_optimizer_state(path, model, optimizer)
    assert not marker.exists()


def test_a_failed_dcp_write_surfaces_the_os_error(tmp_path):
    """DCP wraps a failed write in a CheckpointException (a BaseException) around torch's
    RuntimeError around the OSError; the OS's words must come out."""
    import subprocess
    import sys

    script = f"""
import resource, signal, sys, torch
from torch import nn
from tune_train import checkpointing as ckpt
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
model = nn.Linear(100, 100)
optimizer = torch.optim.Adam(model.parameters())
model(torch.ones(100)).sum().backward()
optimizer.step()
try:
    ckpt.save_optimizer_state(__import__("pathlib").Path({str(tmp_path / "s")!r}), model,
                              optimizer)
except OSError as e:
    print("OSError", e.errno)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip() == "OSError 27", result.stderr[-2000:]  # EFBIG


def test_trainer_state_rejects_what_tune_never_writes(tmp_path):
    folder = tmp_path / "step_0000004"
    folder.mkdir()
    good = {"global_step": 4, "epoch": 0, "step_in_epoch": 4, "world_size": 1, "batch_size": 8,
            "gradient_accumulation_steps": 1, "loss_scaler": {"scale": 65536.0, "good_steps": 3}}
    unset = asdict(ckpt.TrainingState())
    ckpt.write_json(folder / ckpt.TRAINER_STATE, good)  # as tune before it named the recipe
    assert asdict(ckpt.TrainingState.read(folder)) == {**unset, **good}
    # What a run with validation records: the best validation loss so far and its step.
    with_best = {**good, "best_val_loss": 1.25, "best_val_step": 2, "recipe": "full_finetune"}
    ckpt.write_json(folder / ckpt.TRAINER_STATE, with_best)
    assert asdict(ckpt.TrainingState.read(folder)) == {**unset, **with_best}
    # What the state writes, it reads back.
    state = ckpt.TrainingState.read(folder)
    state.write(folder)
    assert ckpt.TrainingState.read(folder) == state
    for bad, message in [
        ({"global_step": True}, "'global_step' is True"),
        ({"epoch": 1.5}, "'epoch' is 1.5"),
        ({"batch_size": 0}, "'batch_size' is 0, expected a whole number >= 1"),
        ({"step_in_epoch": 9}, "'step_in_epoch' \\(9\\) exceeds 'global_step' \\(4\\)"),
        ({"loss_scaler": {"scale": float("inf"), "good_steps": 0}}, "'loss_scaler' is"),
        ({"loss_scaler": [1]}, "'loss_scaler' is"),
        ({"best_val_step": 2}, "'best_val_loss' is None, expected a finite number"),
        ({"best_val_step": -1, "best_val_loss": 1.0}, "'best_val_step' is -1, expected null "
                                                      "or a whole number >= 0"),
        ({"best_val_step": 2, "best_val_loss": float("nan")}, "'best_val_loss' is nan"),
        ({"best_val_step": "2", "best_val_loss": 1.0}, "'best_val_step' is '2'"),
        ({"recipe": 5}, "'recipe' is 5, expected a recipe name"),
    ]:
        ckpt.write_json(folder / ckpt.TRAINER_STATE, {**good, **bad})
        with pytest.raises(ckpt.DamagedCheckpointError, match=message):
            ckpt.TrainingState.read(folder)


def test_rng_state_must_be_torch_rng_states(tmp_path):
    folder = Path(tmp_path)
    torch.save({"cpu": torch.zeros(3)}, folder / ckpt.RNG_STATE)
    with pytest.raises(ckpt.DamagedCheckpointError, match="not a torch RNG state"):
        ckpt.load_rng_state(folder)
    torch.save(ckpt.rng_state(), folder / ckpt.RNG_STATE)
    state = ckpt.load_rng_state(folder)
    ckpt.set_rng_state(state)
    assert torch.equal(torch.get_rng_state(), state["cpu"])


def test_best_is_replaced_whole_and_a_kill_between_the_renames_is_repaired(tmp_path):
    root = ckpt.checkpoint_root(tmp_path)
    for step in (3, 5):
        with ckpt.staging(tmp_path, ckpt.BEST_DIR) as tmp:
            ckpt.write_json(tmp / ckpt.BEST_INFO, {"step": step, "val_loss": 1.0 / step})
    assert ckpt.read_best_info(tmp_path) == {"step": 5, "val_loss": 0.2}
    assert sorted(p.name for p in root.iterdir()) == ["best"]

    # A failed write leaves the previous best as it was.
    with pytest.raises(OSError), ckpt.staging(tmp_path, ckpt.BEST_DIR) as tmp:
        ckpt.write_json(tmp / ckpt.BEST_INFO, {"step": 7, "val_loss": 0.1})
        raise OSError(28, "No space left on device")
    assert ckpt.read_best_info(tmp_path)["step"] == 5
    assert sorted(p.name for p in root.iterdir()) == ["best"]

    # Killed after the first rename: only .old-best holds the best; the next start puts it
    # back. Killed after the second: both exist; the old one goes.
    (root / "best").rename(root / ".old-best")
    ckpt.remove_partial_checkpoints(tmp_path)
    assert ckpt.read_best_info(tmp_path)["step"] == 5
    with ckpt.staging(tmp_path, ckpt.BEST_DIR) as tmp:
        ckpt.write_json(tmp / ckpt.BEST_INFO, {"step": 6, "val_loss": 0.15})
    (root / ".old-best").mkdir()
    ckpt.remove_partial_checkpoints(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["best"]
    assert ckpt.read_best_info(tmp_path)["step"] == 6
    # best is neither resumed from nor pruned.
    assert ckpt.list_checkpoints(tmp_path) == []


def test_a_step_saved_again_is_replaced_by_the_same_protocol(tmp_path):
    """A step folder saved twice (an epoch's end right after save_every_n_steps) goes through
    the renames best goes through: a kill between them leaves the old folder to put back."""
    root = ckpt.checkpoint_root(tmp_path)
    for loss in (1.0, 0.5):
        with ckpt.staging(tmp_path, "step_0000004") as tmp:
            ckpt.write_json(tmp / "note.json", {"loss": loss})
    assert json.loads((root / "step_0000004" / "note.json").read_text()) == {"loss": 0.5}
    assert sorted(p.name for p in root.iterdir()) == ["step_0000004"]
    (root / "step_0000004").rename(root / ".old-step_0000004")  # killed between the renames
    ckpt.remove_partial_checkpoints(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step_0000004"]
