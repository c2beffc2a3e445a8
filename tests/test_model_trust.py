"""A shape file (tune_model.json, config.json) or a training config that declares a model the
weights or the machine cannot hold, and weights holding NaN or infinity, end in one line
naming the file and the value, before memory is spent; a merge into the base's folder or
into an output another merge is writing is one line too: `tune generate`, `tune merge`,
`tune config validate`, as a user types them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from train_helpers import make_demo_files, save_tiny_base, tiny_config

TUNE = str(Path(sys.executable).with_name("tune"))


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """The demo's tokenizer and data, a seeded tiny base, and a LoRA adapter of it."""
    from tune_ckpt import save_peft_adapter
    from tune_models import Decoder, apply_lora, lora_settings, lora_state_dict

    root = tmp_path_factory.mktemp("shapes")
    make_demo_files(root, records=50)
    base, config = save_tiny_base(root)
    model = Decoder(config)
    apply_lora(model, rank=2, alpha=4, targets=["q", "v"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_b" in name:
                p.normal_(0, 0.05)
    save_peft_adapter(root / "adapter", lora_state_dict(model), config=config,
                      settings=lora_settings(model))
    return root


@pytest.fixture
def copy(made, tmp_path) -> Path:
    shutil.copytree(made, tmp_path / "made")
    return tmp_path / "made"


def _tune(*args, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TUNE_DEBUG", None)
    return subprocess.run([TUNE, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=env, **kwargs)


def _one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "unexpected error" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and len(lines[0]) < 600, result.stderr[-3000:]
    return lines[0]


def _generate(root: Path, *extra) -> subprocess.CompletedProcess:
    return _tune("generate", "--checkpoint", root / "start", "--tokenizer",
                 root / "tokenizer.model", "-p", "Sort: dcba", "--max-new-tokens", "3", *extra)


def _edit(path: Path, **fields) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize("fields, message", [
    # 4.9 GB in 80 s, then killed; at 60,000 layers 2.6 GB, 53 s and a 15 MB error line
    ({"n_layers": 60000}, "start/native_pytorch_model.pt: the weights hold 2 layers, but "
                          "{sidecar} declares n_layers 60000: that file describes another model"),
    ({"n_layers": 1_000_000_000}, "{sidecar}: n_layers 1,000,000,000 is larger than any "
                                  "model's (at most 65,536): check the value"),
    ({"rope_theta": float("nan")}, "{sidecar}: rope_theta must be a finite positive number, "
                                   "got nan"),  # generated empty text, exit 0
    ({"dim": 1048576, "hidden_dim": None, "head_dim": None},
     "start/native_pytorch_model.pt: 'tok_embeddings.weight' has shape (64, 64), expected "
     "(64, 1048576) for a native checkpoint with 2 layers (the model as {sidecar} describes it"),
])
def test_generate_refuses_a_shape_file_that_is_not_the_weights(copy, fields, message):
    sidecar = copy / "start" / "tune_model.json"
    _edit(sidecar, **fields)
    start = time.perf_counter()
    line = _one_line(_generate(copy))
    assert message.format(sidecar=sidecar) in line, line
    assert time.perf_counter() - start < 60


def test_generate_and_merge_refuse_a_non_finite_adapter(copy):
    from safetensors.torch import load_file, save_file

    weights = copy / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key][1, :3] = float("nan")
    save_file(tensors, weights)
    expected = (f"error: {weights}: '{key}' holds 3 non-finite values (NaN or infinity) of "
                f"{tensors[key].numel():,}: its training diverged or the file is damaged; use "
                "an earlier checkpoint of the adapter")
    assert _one_line(_generate(copy, "--adapter", copy / "adapter")) == expected
    merged = copy / "merged"
    assert _one_line(_tune("merge", "--checkpoint", copy / "start", "--adapter",
                           copy / "adapter", "-o", merged)) == expected
    assert not merged.exists()


def test_generate_refuses_a_non_finite_base(copy):
    from tune_ckpt import load_native, save_native

    path = copy / "start" / "native_pytorch_model.pt"
    state = {k: v.clone() for k, v in load_native(path).items()}
    state["norm.weight"][7] = float("inf")
    save_native(state, path)
    assert _one_line(_generate(copy)) == (
        f"error: {path}: 'norm.weight' holds 1 non-finite value (NaN or infinity) of 64: the "
        "file is damaged or its training diverged; use another checkpoint")


@pytest.mark.parametrize("model_args, message", [
    ({"n_layers": 1_000_000_000}, "error: model_args: n_layers 1,000,000,000 is larger than "
                                  "any model's (at most 65,536): check the value"),
    ({"n_layers": "1e9"}, "error: model_args: n_layers must be a positive integer, got "
                          "'1e9'"),  # YAML reads 1e9 as text: this was a TypeError's words
    ({"dim": 1048576}, "error: model 'llama2_tiny' with these model_args has 24,256.5 B "
                       "parameters: 97.0 TB in fp32 for the weights alone, more than this "
                       "machine's memory ("),
    ({"rope_theta": float("nan")}, "error: model_args: rope_theta must be a finite positive "
                                   "number, got nan"),
])
def test_config_validate_refuses_a_model_no_machine_holds(made, tmp_path, model_args, message):
    files = {"tokenizer": made / "tokenizer.model", "data": made / "data.jsonl"}
    cfg = tiny_config(files, output_dir=str(tmp_path / "run"), model_args=model_args)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    line = _one_line(_tune("config", "validate", tmp_path / "run.yaml"))
    assert line.startswith(message), line


def test_merge_refuses_the_bases_folder_and_an_output_another_merge_is_writing(copy):
    from tune_ckpt.writing import atomic_write

    base = copy / "start"
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    line = _one_line(_tune("merge", "--checkpoint", base, "--adapter", copy / "adapter",
                           "--to", "hf", "--force", "-o", base))
    assert line == (f"error: {base} is the base checkpoint's folder: write the merged model to "
                    "another folder (-o), or tune generate on it would load the base")
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before

    out = copy / "merged" / "native_pytorch_model.pt"
    with atomic_write(out) as first:  # another merge, still writing (tune's own writer)
        line = _one_line(_tune("merge", "--checkpoint", base, "--adapter", copy / "adapter",
                               "-o", out.parent))
        first.write(b"the first merge")
    # (it used to run, deleting the first one's temporary: that one failed, "No such file")
    assert line.startswith(f"error: another tune command (a merge or a conversion) is writing "
                           f"{out} right now"), line
    assert out.read_bytes() == b"the first merge"
