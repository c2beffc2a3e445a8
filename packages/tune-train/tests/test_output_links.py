"""Nothing is written through a link planted in output_dir (a /tmp folder any local user can
write into), and a checkpoint is resumed only by the recipe that wrote it.

A planted link at a file name tune writes is refused (the lock, the append-only metrics) or
replaced (config.yaml, the plot, a staging folder): the file it points at is never touched.
A ``checkpoints`` link is followed only when it belongs to the user running tune.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tune_train.checkpointing import latest_checkpoint, list_checkpoints
from tune_train.errors import RecipeError

from train_helpers import run_recipe

SECRET = "victim's file\n"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text(SECRET)
    return path


def _plant(output_dir: Path, name: str, target: Path) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    link = output_dir / name
    link.symlink_to(target)
    return link


@pytest.mark.parametrize("name", [".tune.lock", "metrics.jsonl"])
def test_a_link_at_a_file_tune_appends_to_is_refused(tiny_run, victim, name):
    out = Path(tiny_run()["output_dir"])
    link = _plant(out, name, victim)
    with pytest.raises(RecipeError) as e:
        run_recipe(tiny_run(max_steps_per_epoch=2))
    assert str(e.value) == (
        f"{link} is a symbolic link (to {victim}); tune never writes through a link in an "
        "output folder: remove it (someone else may have put it there), or set another "
        "output_dir")
    assert victim.read_text() == SECRET
    assert link.is_symlink()
    assert list_checkpoints(out) == []  # stopped before the first step


def test_a_fifo_at_the_lock_is_refused_without_hanging(tiny_run):
    out = Path(tiny_run()["output_dir"])
    out.mkdir(parents=True)
    os.mkfifo(out / ".tune.lock")
    with pytest.raises(RecipeError, match=r"\.tune\.lock is not a regular file"):
        run_recipe(tiny_run(max_steps_per_epoch=1))


@pytest.mark.parametrize("name", ["config.yaml", "loss_curve.png", "loss_curve.png.tmp"])
def test_a_link_at_a_file_tune_replaces_is_replaced_not_written_through(tiny_run, victim, name):
    out = Path(tiny_run()["output_dir"])
    link = _plant(out, name, victim)
    run_recipe(tiny_run(max_steps_per_epoch=2, plot=True))
    assert victim.read_text() == SECRET
    if name != "loss_curve.png.tmp":  # a name tune used to write, now never opened
        assert not link.is_symlink() and link.stat().st_size > 0
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "model: llama2_tiny" in (out / "config.yaml").read_text()


def test_a_planted_staging_folder_link_is_removed_not_followed(tiny_run, tmp_path):
    """``.tmp-step_*`` is where a checkpoint is assembled: a link there pointing at someone's
    folder must not have that folder filled (or emptied)."""
    out = Path(tiny_run()["output_dir"])
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text(SECRET)
    _plant(out / "checkpoints", ".tmp-step_0000002", theirs)
    run_recipe(tiny_run(max_steps_per_epoch=2))
    assert sorted(p.name for p in theirs.iterdir()) == ["keep.txt"]
    assert (theirs / "keep.txt").read_text() == SECRET
    assert latest_checkpoint(out).name == "step_0000002"


def test_a_checkpoints_link_of_your_own_is_followed(tiny_run, tmp_path):
    """Checkpoints kept on another disk: output_dir/checkpoints -> elsewhere, made by you."""
    out = Path(tiny_run()["output_dir"])
    elsewhere = tmp_path / "big-disk"
    elsewhere.mkdir()
    _plant(out, "checkpoints", elsewhere)
    run_recipe(tiny_run(max_steps_per_epoch=2))
    assert [p.name for p in elsewhere.iterdir()] == ["step_0000002"]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a link to another user needs root")
def test_a_checkpoints_link_another_user_made_is_refused(tiny_run, tmp_path):
    out = Path(tiny_run()["output_dir"])
    elsewhere = tmp_path / "theirs"
    elsewhere.mkdir()
    link = _plant(out, "checkpoints", elsewhere)
    os.lchown(link, 4321, 4321)
    with pytest.raises(RecipeError) as e:
        run_recipe(tiny_run(max_steps_per_epoch=2))
    assert str(e.value) == (
        f"{link} is a symbolic link (to {elsewhere}) that another user made; tune only writes "
        "checkpoints through a link you own: remove it, or set another output_dir")
    assert list(elsewhere.iterdir()) == []


# ----------------------------------------------------------------------------- recipes
def _lora(tiny_run, **extra) -> dict:
    return tiny_run(lora_rank=4, lora_target_modules=["q", "v"], **extra)


@pytest.mark.parametrize("written_by", ["lora_finetune", "full_finetune"])
def test_a_checkpoint_is_resumed_only_by_the_recipe_that_wrote_it(tiny_run, written_by):
    """Resuming a LoRA run with full_finetune (or the reverse) names the recipe to run; it
    never advises deleting a checkpoint that is not damaged."""
    lora = written_by == "lora_finetune"
    first = (_lora(tiny_run) if lora else tiny_run())
    run_recipe({**first, "save_every_n_steps": 1, "max_steps_per_epoch": 2}, written_by)
    out = Path(first["output_dir"])
    before = [p.name for p in list_checkpoints(out)]
    other = "full_finetune" if lora else "lora_finetune"
    again = tiny_run(resume_from_checkpoint=True) if lora else _lora(
        tiny_run, resume_from_checkpoint=True)
    with pytest.raises(RecipeError) as e:
        run_recipe(again, other)
    latest = latest_checkpoint(out)
    assert str(e.value) == (
        f"{latest} is a checkpoint of a {written_by} run, which {other} cannot continue; "
        f"resume it with the recipe that wrote it (tune run {written_by} --config ... "
        f"resume_from_checkpoint=True), or set another output_dir for this {other} run")
    assert "delete" not in str(e.value)
    assert [p.name for p in list_checkpoints(out)] == before
    # The right recipe continues it.
    run_recipe({**first, "resume_from_checkpoint": True, "epochs": 2, "max_steps_per_epoch": 2},
               written_by)
    assert latest_checkpoint(out).name == "step_0000004"


def test_the_lock_names_its_holder_in_a_regular_file(tiny_run):
    """The lock is still a plain file holding who has it (what a second run reports)."""
    run_recipe(tiny_run(max_steps_per_epoch=1))
    lock = Path(tiny_run()["output_dir"]) / ".tune.lock"
    assert lock.is_file() and not lock.is_symlink()
    assert lock.read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
