"""The tune-ckpt wheel, with the tune-models wheel it needs (torch only) and nothing else of the
workspace, installs into a fresh venv and converts every family from its console script.

Dependencies are pinned to the versions of this environment and linked from uv's cache, so
the install takes seconds (no torch download).
"""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tune_ckpt import load_native, meta_to_native, save_native
from tune_models import Decoder, qwen2_tiny

from fixtures_hub import write_meta_checkpoint

REPO = Path(__file__).resolve().parents[3]
UV = os.environ.get("UV") or shutil.which("uv")


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.skipif(UV is None, reason="uv is not installed")
def test_wheels_install_alone_and_convert_from_the_console_script(tmp_path):
    dist = tmp_path / "dist"
    for package in ("tune-models", "tune-ckpt"):
        built = _run(UV, "build", "--package", package, "--wheel", "-o", str(dist),
                     "--no-config", cwd=REPO)
        assert built.returncode == 0, built.stderr
    wheels = sorted(str(p) for p in dist.glob("tune_*.whl"))
    assert len(wheels) == 2, wheels

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

    # (click is there: huggingface_hub's `hf` command needs it. It must not be imported.)
    absent = _run(str(python), "-c", "import importlib.util as u; print([m for m in "
                  "('tune_data', 'tune_train', 'tune_cli', 'datasets', 'transformers') "
                  "if u.find_spec(m)])")
    assert absent.stdout.strip() == "[]", "the wheels pulled in more than tune-models"

    # Meta (Llama 2 layout) -> native.
    params = {"dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 16,
              "vocab_size": 40}
    reference = write_meta_checkpoint(tmp_path / "meta", params, vocab_size=40)
    tune_ckpt = str(venv / "bin" / "tune-ckpt")
    result = _run(tune_ckpt, "convert", "--checkpoint-path",
                  str(tmp_path / "meta" / "consolidated.00.pth"), "--to", "native",
                  "--output-path", str(tmp_path / "meta" / "model.safetensors"), "--quiet")
    assert result.returncode == 0, result.stderr
    converted = load_native(tmp_path / "meta" / "model.safetensors")
    expected = meta_to_native(reference, n_heads=4, n_kv_heads=2)
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)

    # A Qwen2 (biases, tied embeddings) native -> HF -> native, the modules it imported listed.
    config = qwen2_tiny(vocab_size=64)
    model = Decoder(config)
    native = save_native(model.state_dict(), tmp_path / "qwen" / "native_pytorch_model.pt",
                         model_args=config, family="qwen2")
    code = (
        "import json, sys\n"
        "from tune_ckpt.cli import main\n"
        f"assert main(['convert', '--checkpoint-path', {str(native)!r}, '--to', 'hf', "
        "'--quiet']) == 0\n"
        f"assert main(['convert', '--checkpoint-path', {str(native.parent / 'hf_model')!r}, "
        f"'--output-path', {str(tmp_path / 'back' / 'native_pytorch_model.pt')!r}, "
        "'--quiet']) == 0\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    result = _run(str(python), "-c", code)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.splitlines()[-1]))
    assert not loaded & {"datasets", "click", "tune_train", "tune_data", "transformers"}
    hf_config = json.loads((native.parent / "hf_model" / "config.json").read_text())
    assert hf_config["architectures"] == ["Qwen2ForCausalLM"]
    back = load_native(tmp_path / "back" / "native_pytorch_model.pt")
    original = model.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
