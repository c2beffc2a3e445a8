"""A checkpoint folder is user input: resuming from one, or generating, evaluating and
converting from its model file, must never run code planted in it, and a damaged checkpoint
(or a full disk while saving one) must end in one line that names the folder and what to do,
with the previous checkpoint still there to resume from. Real `tune` processes throughout."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from tune_train.checkpointing import latest_checkpoint, list_checkpoints

from train_helpers import make_demo_files, tiny_config

TUNE = str(Path(sys.executable).with_name("tune"))
LATEST, PREVIOUS = "step_0000004", "step_0000002"


class _RunsCode:
    """Unpickling this runs a shell command: what a planted checkpoint file would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run with checkpoints at steps 2 and 4 (its config is run.yaml)."""
    root = tmp_path_factory.mktemp("trust")
    files = make_demo_files(root / "data")
    out = root / "run"
    cfg = tiny_config(files, output_dir=str(out), max_steps_per_epoch=4, save_every_n_steps=2)
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    result = _tune("run", "full_finetune", "--config", str(root / "run.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in list_checkpoints(out)] == [PREVIOUS, LATEST]
    return root


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of the trained run; its config points at the copy."""
    out = tmp_path / "run"
    shutil.copytree(trained / "run", out)
    cfg = yaml.safe_load((trained / "run.yaml").read_text())
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**cfg, "output_dir": str(out)}))
    return out


def _tune(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TUNE_DEBUG", None)
    return subprocess.run([TUNE, *args], capture_output=True, text=True, timeout=300, env=env,
                          **kwargs)


def _resume(run: Path, *overrides: str, **kwargs) -> subprocess.CompletedProcess:
    return _tune("run", "full_finetune", "--config", str(run.with_suffix(".yaml")),
                 "resume_from_checkpoint=True", *overrides, **kwargs)


def _one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- planted code
def _plant_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_RunsCode(f"touch {marker}")))


def _plant_torch(path: Path, marker: Path) -> None:
    torch.save(_RunsCode(f"touch {marker}"), path)


def _plant_distcp(path: Path, marker: Path) -> None:
    """Point every record of the (valid) metadata at a payload in the shard file."""
    metadata_file = path.parent / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())  # our own fresh file: trusted here
    _plant_torch(path, marker)
    size = path.stat().st_size
    for info in metadata.storage_data.values():
        info.offset, info.length = 0, size
    metadata_file.write_bytes(pickle.dumps(metadata))


PLANTS = {
    "training_state/.metadata": _plant_pickle,
    "training_state/__0_0.distcp": _plant_distcp,
    "rng_state.pt": _plant_torch,
    "native_pytorch_model.pt": _plant_torch,
    "trainer_state.json": _plant_pickle,
}


@pytest.mark.parametrize("name", list(PLANTS))
def test_resume_never_runs_code_planted_in_a_checkpoint(run, tmp_path, name):
    marker = tmp_path / "payload-ran"
    checkpoint = run / "checkpoints" / LATEST
    PLANTS[name](checkpoint / name, marker)
    line = _one_line(_resume(run))
    assert not marker.exists(), "the planted code ran"
    assert str(checkpoint) in line and Path(name).name in line, line
    assert f"delete it to resume from {PREVIOUS}" in line, line


@pytest.mark.parametrize("command", [
    ["generate", "-p", "Add: 1+2", "--max-new-tokens", "2"],
    ["eval", "--perplexity", "TEXT"],
    ["convert_checkpoint", "--to", "hf"],
])
def test_generate_eval_and_convert_never_run_code_planted_in_the_model_file(run, tmp_path,
                                                                            command):
    marker = tmp_path / "payload-ran"
    checkpoint = run / "checkpoints" / LATEST
    _plant_torch(checkpoint / "native_pytorch_model.pt", marker)
    (tmp_path / "text.txt").write_text("Reverse: abc\nabc\n")
    args = [str(tmp_path / "text.txt") if a == "TEXT" else a for a in command]
    flag = "--checkpoint_path" if command[0] == "convert_checkpoint" else "--checkpoint"
    line = _one_line(_tune(*args, flag, str(checkpoint)))
    assert not marker.exists(), "the planted code ran"
    assert str(checkpoint / "native_pytorch_model.pt") in line, line
    assert "arbitrary Python objects" in line, line


# ----------------------------------------------------------------------------- damage
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_state(**changes) -> Callable[[Path], None]:
    def edit(checkpoint: Path) -> None:
        path = checkpoint / "trainer_state.json"
        state = json.loads(path.read_text())
        for key, value in changes.items():
            if value is ...:
                del state[key]
            else:
                state[key] = value
        path.write_text(json.dumps(state))

    return edit


DAMAGE = {
    "truncated .distcp": (lambda c: _truncate(c / "training_state" / "__0_0.distcp"),
                          "__0_0.distcp"),
    "empty .metadata": (lambda c: (c / "training_state" / ".metadata").write_bytes(b""),
                        ".metadata"),
    "truncated .metadata": (lambda c: _truncate(c / "training_state" / ".metadata"),
                            ".metadata"),
    "missing training_state": (lambda c: shutil.rmtree(c / "training_state"),
                               "training_state"),
    "missing rng_state.pt": (lambda c: (c / "rng_state.pt").unlink(), "rng_state.pt"),
    "truncated model file": (lambda c: _truncate(c / "native_pytorch_model.pt"),
                             "native_pytorch_model.pt"),
    "missing model file": (lambda c: (c / "native_pytorch_model.pt").unlink(), "model"),
    "global_step not a number": (_edit_state(global_step="x"), "global_step"),
    "negative epoch": (_edit_state(epoch=-5), "epoch"),
    "global_step not the folder's": (_edit_state(global_step=7), "global_step"),
    "missing step_in_epoch": (_edit_state(step_in_epoch=...), "step_in_epoch"),
    "zero world_size": (_edit_state(world_size=0), "world_size"),
    "bad loss scale": (_edit_state(loss_scaler={"scale": "big", "good_steps": 0}),
                       "loss_scaler"),
    "not an object": (lambda c: (c / "trainer_state.json").write_text("[1, 2]"),
                      "trainer_state.json"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_one_line_naming_it_and_the_previous_one(run, damage):
    spoil, what = DAMAGE[damage]
    checkpoint = run / "checkpoints" / LATEST
    spoil(checkpoint)
    line = _one_line(_resume(run))
    assert str(checkpoint) in line and what in line, line
    assert f"delete it to resume from {PREVIOUS}" in line, line


def test_the_advice_works_deleting_the_damaged_checkpoint_resumes_from_the_previous(run):
    checkpoint = run / "checkpoints" / LATEST
    _truncate(checkpoint / "training_state" / "__0_0.distcp")
    assert _resume(run).returncode != 0
    shutil.rmtree(checkpoint)
    result = _resume(run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / PREVIOUS}" in result.stdout + result.stderr
    assert latest_checkpoint(run) == checkpoint  # step 4 saved again, from step 2 on


def test_the_only_checkpoint_damaged_says_deleting_it_starts_over(run):
    shutil.rmtree(run / "checkpoints" / PREVIOUS)
    checkpoint = run / "checkpoints" / LATEST
    (checkpoint / "training_state" / ".metadata").write_bytes(b"")
    line = _one_line(_resume(run))
    assert str(checkpoint) in line and "delete it to start from the beginning" in line, line


def test_resuming_with_another_optimizer_is_one_line_not_damage(run):
    line = _one_line(_resume(run, "optimizer=SGD", "optimizer_args={momentum: 0.9}"))
    assert str(run / "checkpoints" / LATEST) in line and "does not fit this run" in line, line
    assert "resume with the model, optimizer and optimizer_args it was saved with" in line, line
    assert "delete" not in line, "the checkpoint is fine: deleting it is the wrong advice"


# ----------------------------------------------------------------------------- disk full
@pytest.mark.parametrize("failing", ["model file", "optimizer state"])
def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_latest(run, failing):
    checkpoint = run / "checkpoints" / LATEST
    model = (checkpoint / "native_pytorch_model.pt").stat().st_size
    optimizer = (checkpoint / "training_state" / "__0_0.distcp").stat().st_size
    assert optimizer > model, "the test needs the optimizer state to be the bigger file"
    limit = model // 2 if failing == "model file" else (model + optimizer) // 2

    def small_disk():  # files may not grow past `limit`, as on a nearly full disk (EFBIG)
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    # A second epoch: steps 5 and 6 train, then the save of step 6 hits the limit.
    result = _resume(run, "epochs=2", preexec_fn=small_disk)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    saving = run / "checkpoints" / "step_0000006"
    assert str(saving) in line and os.strerror(27) in line, line  # EFBIG: "File too large"
    assert f"{LATEST} is still the latest checkpoint" in line, line
    assert latest_checkpoint(run) == checkpoint
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [PREVIOUS, LATEST]
