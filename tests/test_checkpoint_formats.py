"""Every step folder the recipe writes, in both checkpoint formats, is a native checkpoint to
`tune generate`, `tune eval` and `tune convert_checkpoint` (there and back), as a user would
pass it: the folder itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tune_ckpt import load_native
from tune_ckpt.names import HF_SAFETENSORS_FILE, NATIVE_FILE
from tune_train.checkpointing import MODEL_FILES, latest_checkpoint

from train_helpers import make_demo_files, tiny_config

TUNE = str(Path(sys.executable).with_name("tune"))


def _tune(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([TUNE, *args], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def step_folders(tmp_path_factory) -> dict[str, Path]:
    """The last checkpoint of the same tiny run, saved as pt and as safetensors."""
    root = tmp_path_factory.mktemp("formats")
    files = make_demo_files(root / "data")
    folders = {}
    for fmt in MODEL_FILES:
        out = root / fmt
        cfg = tiny_config(files, output_dir=str(out), max_steps_per_epoch=3,
                          checkpoint_format=fmt)
        (root / f"{fmt}.yaml").write_text(yaml.safe_dump(cfg))
        _tune("run", "full_finetune", "--config", str(root / f"{fmt}.yaml"))
        folders[fmt] = latest_checkpoint(out)
    return folders


@pytest.mark.parametrize("fmt", list(MODEL_FILES))
def test_the_recipe_names_its_model_file_as_a_native_checkpoint(step_folders, fmt):
    names = {p.name for p in step_folders[fmt].iterdir()}
    assert MODEL_FILES[fmt] in names
    assert HF_SAFETENSORS_FILE not in names, "a Hugging Face name makes it look like an HF folder"


@pytest.mark.parametrize("fmt", list(MODEL_FILES))
def test_generate_and_eval_take_the_step_folder(step_folders, fmt, tmp_path):
    folder = step_folders[fmt]
    out = _tune("generate", "--checkpoint", str(folder), "-p", "Add: 1+2", "--max-new-tokens", "3")
    assert f"[{folder / MODEL_FILES[fmt]}]" in out.stderr
    text = tmp_path / "text.txt"
    text.write_text("Reverse: abc\ncba\nSort: cab\nabc\n")
    result = _tune("eval", "--checkpoint", str(folder), "--perplexity", str(text))
    assert result.stdout.startswith("perplexity ")


def test_both_formats_hold_the_same_model(step_folders, tmp_path):
    """The same seeded run saved both ways: the weights, and so the perplexity, are equal."""
    pt, st = (load_native(step_folders[f] / MODEL_FILES[f]) for f in ("pt", "safetensors"))
    assert pt.keys() == st.keys() and all(torch.equal(pt[k], st[k]) for k in pt)
    text = tmp_path / "text.txt"
    text.write_text("Add: 4+5\n9\n")
    lines = [_tune("eval", "--checkpoint", str(step_folders[f]), "--perplexity",
                   str(text)).stdout.split(" (")[0] for f in ("pt", "safetensors")]
    assert lines[0] == lines[1]


@pytest.mark.parametrize("fmt", list(MODEL_FILES))
def test_convert_the_step_folder_to_hf_and_back(step_folders, fmt, tmp_path):
    folder = step_folders[fmt]
    hf = tmp_path / "hf"
    _tune("convert_checkpoint", "--checkpoint_path", str(folder), "--to", "hf", "-o", str(hf))
    assert (hf / "config.json").is_file() and (hf / HF_SAFETENSORS_FILE).is_file()
    back = tmp_path / "back" / NATIVE_FILE
    _tune("convert_checkpoint", "--checkpoint_path", str(hf), "--to", "native", "-o", str(back))
    original, again = load_native(folder / MODEL_FILES[fmt]), load_native(back)
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)
    # The result is usable as it stands: generate reads the shape from its tune_model.json.
    tokenizer = tmp_path / "back" / "tokenizer.model"
    tokenizer.write_bytes((folder.parent.parent.parent / "data" / "tokenizer.model").read_bytes())
    _tune("generate", "--checkpoint", str(back.parent), "-p", "Sort: cba", "--max-new-tokens", "3")


def test_a_step_folder_of_an_older_tune_with_model_safetensors_still_works(step_folders,
                                                                           tmp_path):
    """Before the native name, checkpoint_format: safetensors wrote model.safetensors."""
    import shutil

    old = tmp_path / "step_0000003"
    shutil.copytree(step_folders["safetensors"], old)
    (old / MODEL_FILES["safetensors"]).rename(old / HF_SAFETENSORS_FILE)
    (old / "tokenizer.model").write_bytes(
        (step_folders["pt"].parent.parent.parent / "data" / "tokenizer.model").read_bytes())
    _tune("generate", "--checkpoint", str(old), "-p", "Add: 1+2", "--max-new-tokens", "3")
    _tune("convert_checkpoint", "--checkpoint_path", str(old), "--to", "hf", "-o",
          str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "config.json").is_file()
