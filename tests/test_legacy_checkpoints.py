"""Checkpoints an earlier tune wrote still resume and load.

tests/fixtures/legacy_5cb8ced holds runs made by tune at commit 5cb8ced (before tune-train was
reorganised into library modules and recipe scripts; testing/make_legacy_checkpoints.py made
them): a full and a LoRA run, each as a kill after its step-3 checkpoint left it, and the
metrics each run logged when left to finish. Resuming either with today's tune must give
those losses; generate, eval and merge must take the checkpoints as they are.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_5cb8ced"


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    # The configs' paths are relative to the fixture folder: commands run from a copy of it.
    copy = tmp_path / "legacy"
    shutil.copytree(FIXTURE, copy)
    return copy


def _tune(folder: Path, *args: str) -> subprocess.CompletedProcess:
    tune = str(Path(sys.executable).with_name("tune"))
    return subprocess.run([tune, *args], cwd=folder, capture_output=True, text=True,
                          timeout=300)


def _records(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.parametrize("run,recipe", [("full", "full_finetune"), ("lora", "lora_finetune")])
def test_an_earlier_tunes_checkpoint_resumes_to_the_same_losses(legacy: Path, run: str,
                                                                 recipe: str):
    proc = _tune(legacy, "run", recipe, "--config", f"{run}/config.yaml",
                 "resume_from_checkpoint=True")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    got = _records(legacy / run / "metrics.jsonl")
    want = _records(FIXTURE / f"{run}.jsonl")
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    # Bit for bit on the CPU that made the fixture; other CPUs round differently.
    for step in (4, 5, 6):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-4, abs=1e-5)
    assert got[6]["val_loss"] == pytest.approx(want[6]["val_loss"], rel=1e-4, abs=1e-5)
    assert (legacy / run / "checkpoints" / "step_0000006").is_dir()


def test_an_earlier_tunes_checkpoints_load_in_generate_eval_and_merge(legacy: Path):
    text = legacy / "notes.txt"
    text.write_text("Reverse: abc\ncba\nAdd: 3+4\n7\n" * 4)
    full = "full/checkpoints/step_0000003"
    lora = "lora/checkpoints/step_0000003"
    base = "start/native_pytorch_model.pt"
    for args in (
        ("generate", "--checkpoint", full, "--template", "demo", "-p", "Add: 3+4",
         "--max-new-tokens", "4"),
        ("generate", "--checkpoint", base, "--adapter", lora, "--tokenizer", "tokenizer.model",
         "-p", "Sort: cab", "--max-new-tokens", "4"),
        ("eval", "--checkpoint", full, "--perplexity", str(text)),
        ("merge", "--checkpoint", base, "--adapter", lora, "-o", "merged"),
        ("convert_checkpoint", "--checkpoint_path", full, "--to", "hf", "-o", "full-hf"),
    ):
        proc = _tune(legacy, *args)
        assert proc.returncode == 0, f"{args}: {proc.stderr[-2000:]}"
    assert (legacy / "merged" / "native_pytorch_model.pt").is_file()
    assert (legacy / "full-hf" / "config.json").is_file()
