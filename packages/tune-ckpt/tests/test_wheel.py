"""The tune-ckpt wheel installs with tune-models only (its one workspace dependency: the
model's key schema and the LoRA adapter schema are defined there, torch only) and converts.

Dependencies are pinned to the versions of this environment and linked from uv's cache, so
the install takes seconds (no torch download).
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tune_ckpt import load_native, meta_to_native

from fixtures_hub import write_meta_checkpoint

REPO = Path(__file__).resolve().parents[3]
UV = os.environ.get("UV") or shutil.which("uv")


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.skipif(UV is None, reason="uv is not installed")
def test_wheel_installs_with_tune_models_only_and_converts_from_its_console_script(tmp_path):
    for package in ("tune-models", "tune-ckpt"):
        built = _run(UV, "build", "--package", package, "--wheel", "-o", str(tmp_path / "dist"),
                     "--no-config", cwd=REPO)
        assert built.returncode == 0, built.stderr
    wheels = sorted(str(w) for w in (tmp_path / "dist").glob("tune_*.whl"))
    assert len(wheels) == 2

    venv = tmp_path / "venv"
    assert _run(UV, "venv", "-q", str(venv), "--python", sys.executable).returncode == 0
    python = venv / "bin" / "python"
    pins = sorted({f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
                   if not d.metadata["Name"].startswith("tune")})
    (tmp_path / "pins.txt").write_text("\n".join(pins))
    install = [UV, "pip", "install", "-q", "--no-config", "--python", str(python),
               "-c", str(tmp_path / "pins.txt"), *wheels]
    # Offline first (pure cache); uv may still need the index pages, then it asks PyPI.
    done = _run(*install, "--offline", cwd=tmp_path)
    if done.returncode != 0:
        done = _run(*install, cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    absent = _run(str(python), "-c", "import importlib.util as u; print([m for m in "
                  "('tune_data', 'tune_train', 'tune_cli', 'datasets', 'click') "
                  "if u.find_spec(m)])")
    assert absent.stdout.strip() == "[]", "the wheel pulled in other workspace packages"

    params = {"dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 16,
              "vocab_size": 40}
    reference = write_meta_checkpoint(tmp_path / "ckpt", params, vocab_size=40)
    result = _run(str(venv / "bin" / "tune-ckpt"), "convert", "--checkpoint-path",
                  str(tmp_path / "ckpt" / "consolidated.00.pth"), "--to", "native",
                  "--output-path", str(tmp_path / "ckpt" / "model.safetensors"), "--quiet")
    assert result.returncode == 0, result.stderr
    converted = load_native(tmp_path / "ckpt" / "model.safetensors")
    expected = meta_to_native(reference, n_heads=4, n_kv_heads=2)
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)
