"""Checkpoints that a kill at any moment cannot corrupt.

Layout under ``<output_dir>/checkpoints``::

    step_0000120/
        native_pytorch_model.pt   the model, native key schema (tune generate, tune-ckpt read it)
        tune_model.json           the model's shape (Llama2Config fields)
        training_state/           optimizer state, torch.distributed.checkpoint (resharding: a
                                  run can resume on a different number of processes)
        trainer_state.json        step, epoch, position in the epoch, loss scale
        rng_state.pt              torch RNG states (tensors only)

A checkpoint is assembled in ``.tmp-step_0000120`` and renamed into place once every file is
written and fsynced, so the newest ``step_*`` folder is always complete; leftovers of a kill are
removed on the next start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

MODEL_FILE = "native_pytorch_model.pt"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / TRAINER_STATE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def remove_partial_checkpoints(output_dir: str | Path) -> None:
    """Delete what a kill in the middle of a save left behind."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (renamed away first: never half-gone)."""
    for old in list_checkpoints(output_dir)[:-keep]:
        doomed = old.with_name(f".tmp-delete-{old.name}")
        old.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def staging_dir(output_dir: str | Path, step: int, is_main: bool = True) -> Iterator[Path]:
    """Yield a temporary folder to write a checkpoint into; publish it on success.

    Every rank writes its shards into the same staging folder; only the main rank publishes
    (the caller must barrier between writing and leaving this context).
    """
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-{final.name}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    yield tmp
    if is_main:
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. epoch end right after save_every)
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(root)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_optimizer_state(path: Path, model: torch.nn.Module,
                         optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state keyed by parameter names, sharded as the parameters are (DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    with warnings.catch_warnings():
        # One process is a supported case, not a mistake worth a warning on every save.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=path)


def load_optimizer_state(path: Path, model: torch.nn.Module,
                         optimizer: torch.optim.Optimizer) -> None:
    """Load what save_optimizer_state wrote, resharded to this run's processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    class _WeightsOnlyPlanner(DefaultLoadPlanner):
        # The default planner unpickles non-tensor entries with weights_only=False; ours
        # (param_groups: numbers, tuples, names) load fine under weights_only=True.
        def load_bytes(self, read_item, value):
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict,
                            self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, planner=_WeightsOnlyPlanner())
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
