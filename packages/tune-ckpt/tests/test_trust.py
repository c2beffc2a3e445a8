"""Checkpoints, adapters and output folders are user input: a shape file that declares
another model is refused from file headers before memory is spent, NaN or infinity in an
adapter or a base never becomes a merged model, and a link planted where tune writes is
replaced, never written through."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch

from tune_ckpt import (
    CheckpointError,
    convert,
    load_native,
    load_peft_adapter,
    merge_adapter,
    save_native,
    save_peft_adapter,
    write_model_args,
)
from tune_models import Decoder, DecoderConfig, apply_lora, lora_settings, lora_state_dict

from fixtures_hub import write_meta_checkpoint

CONFIG = DecoderConfig(vocab_size=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       multiple_of=16, max_seq_len=64)
META = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 16,
        "norm_eps": 1e-05, "vocab_size": -1}


def _model(seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    model = Decoder(CONFIG)
    model.init_weights()
    return model


@pytest.fixture
def base(tmp_path) -> Path:
    """A tiny native checkpoint with its tune_model.json."""
    return save_native(_model().state_dict(), tmp_path / "base" / "native_pytorch_model.pt",
                       model_args=CONFIG, family="llama2")


@pytest.fixture
def adapter(tmp_path) -> Path:
    """A LoRA adapter of the base (q, v, down), B not zero, so it changes the model."""
    model = _model()
    apply_lora(model, rank=2, alpha=4, targets=["q", "v", "down"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_b" in name:
                p.normal_(0, 0.05)
    return save_peft_adapter(tmp_path / "adapter", lora_state_dict(model), config=CONFIG,
                             settings=lora_settings(model))


def _edit_sidecar(folder: Path, name: str = "tune_model.json", **fields) -> None:
    path = folder / name
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


# ------------------------------------------------------------ shapes checked before building
def test_a_shape_file_declaring_far_more_layers_is_refused_from_the_header(base, monkeypatch):
    _edit_sidecar(base.parent, n_layers=60000)  # within DecoderConfig's bounds, not the file's
    built = []
    monkeypatch.setattr(Decoder, "__init__", lambda self, *a: built.append(a))
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as caught:
        merge_adapter(base, base.parent, base.parent.parent / "out", progress=False)
    assert str(caught.value) == (
        f"{base}: the weights hold 2 layers, but {base.parent / 'tune_model.json'} declares "
        "n_layers 60000: that file describes another model (correct it, or use the one that "
        "came with these weights)")
    assert not built, "a model was built before the shapes were compared"
    assert time.perf_counter() - start < 5


def test_a_wrong_width_names_the_file_the_key_and_the_declared_shape(base):
    _edit_sidecar(base.parent, dim=1048576, hidden_dim=None, head_dim=None)
    with pytest.raises(CheckpointError) as caught:
        merge_adapter(base, base.parent, base.parent.parent / "out", progress=False)
    assert str(caught.value).startswith(
        f"{base}: 'tok_embeddings.weight' has shape (32, 32), expected (32, 1048576) for a "
        "native llama2 checkpoint with 2 layers (the model as "
        f"{base.parent / 'tune_model.json'} describes it")


def test_convert_compares_config_json_layers_with_the_weights_before_planning(tmp_path):
    folder = tmp_path / "llama"
    write_meta_checkpoint(folder, META, vocab_size=32)
    hf = convert(folder, target_format="hf", progress=False)
    _edit_sidecar(hf, "config.json", num_hidden_layers=60000)
    with pytest.raises(CheckpointError) as caught:
        convert(hf, output_path=tmp_path / "out.pt", progress=False)
    assert str(caught.value) == (
        f"{hf / 'model.safetensors'}: the weights hold 2 layers, but {hf / 'config.json'} "
        "declares num_hidden_layers 60000: that file describes another model (correct it, or "
        "use the one that came with these weights)")
    _edit_sidecar(hf, "config.json", num_hidden_layers=1_000_000_000)
    with pytest.raises(CheckpointError, match="n_layers 1,000,000,000 is larger than any "
                                              "model's"):
        convert(hf, output_path=tmp_path / "out.pt", progress=False)
    assert not (tmp_path / "out.pt").exists()


def test_check_model_fits_reads_names_and_shapes_only(base):
    from tune_ckpt import check_model_fits

    state = load_native(base)
    check_model_fits(state, CONFIG, where=str(base))  # the model the file holds: fine
    fewer = DecoderConfig(**{**vars(CONFIG), "n_layers": 1})
    with pytest.raises(CheckpointError, match=r"the weights hold 2 layers, but the model has "
                                              r"n_layers 1"):
        check_model_fits(state, fewer, where=str(base))


# ------------------------------------------------------------------- non-finite weights
def _poison_adapter(adapter: Path, value: float) -> str:
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(tensors)[1]
    tensors[key][0, 0] = value
    save_file(tensors, path)
    return key


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_adapter_is_refused_at_load_naming_the_tensor(base, adapter, tmp_path,
                                                                   value):
    key = _poison_adapter(adapter, value)
    with pytest.raises(CheckpointError) as caught:
        load_peft_adapter(adapter, CONFIG)
    assert str(caught.value) == (
        f"{adapter / 'adapter_model.safetensors'}: '{key}' holds 1 non-finite value (NaN or "
        f"infinity) of {load_native(adapter / 'adapter_model.safetensors')[key].numel():,}: "
        "its training diverged or the file is damaged; use an earlier checkpoint of the "
        "adapter")
    with pytest.raises(CheckpointError, match=f"'{key}' holds 1 non-finite value"):
        merge_adapter(base, adapter, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


def test_a_non_finite_base_is_refused_before_the_merge_is_written(base, adapter, tmp_path):
    state = {k: v.clone() for k, v in load_native(base).items()}
    state["layers.1.feed_forward.w2.weight"][3, :5] = float("nan")
    save_native(state, base)
    with pytest.raises(CheckpointError) as caught:
        merge_adapter(base, adapter, tmp_path / "merged", progress=False)
    assert str(caught.value).startswith(
        f"{base}: 'layers.1.feed_forward.w2.weight' holds 5 non-finite values (NaN or "
        f"infinity) of {CONFIG.dim * CONFIG.hidden_dim:,}: the file is damaged or its "
        "training diverged; use another checkpoint")
    assert not (tmp_path / "merged").exists()


def test_overlapping_safetensors_offsets_are_refused(adapter):
    path = adapter / "adapter_model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    keys = sorted(k for k in header if k != "__metadata__")
    # Point the second tensor at the first one's bytes (same size: both are lora_A of rank 2
    # and width 32): the file stays well-formed otherwise, and the merge would change.
    a, b = [k for k in keys if header[k]["shape"] == header[keys[0]]["shape"]][:2]
    header[b]["data_offsets"] = header[a]["data_offsets"]
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    with pytest.raises(CheckpointError) as caught:
        load_peft_adapter(adapter, CONFIG)
    assert str(caught.value) == (
        f"{path}: '{a}' and '{b}' claim the same bytes (overlapping data offsets); the file is "
        "corrupt or was crafted: fetch or save it again")


# ------------------------------------------------------------------------- output folders
def test_a_merge_into_the_base_checkpoints_folder_is_refused(base, adapter):
    before = sorted(p.name for p in base.parent.iterdir())
    with pytest.raises(CheckpointError) as caught:
        merge_adapter(base, adapter, base.parent, target_format="hf", force=True,
                      progress=False)
    assert str(caught.value) == (
        f"{base.parent} is the base checkpoint's folder: write the merged model to another "
        "folder (-o), or tune generate on it would load the base")
    with pytest.raises(CheckpointError, match="is the base checkpoint's folder"):
        merge_adapter(base, adapter, base.parent / "merged.safetensors", force=True,
                      progress=False)
    assert sorted(p.name for p in base.parent.iterdir()) == before


@pytest.mark.parametrize("target_format", ["native", "hf"])
def test_a_second_merge_to_an_output_being_written_says_so(base, adapter, tmp_path,
                                                           target_format):
    from tune_ckpt.writing import atomic_write, staged_folder

    out = tmp_path / "merged"
    writing = atomic_write(out / "native_pytorch_model.pt") if target_format == "native" \
        else staged_folder(out)
    with writing as first:  # the first merge, still writing
        with pytest.raises(CheckpointError) as caught:
            merge_adapter(base, adapter, out, target_format=target_format, progress=False)
        if target_format == "native":
            first.write(b"the first merge's bytes")
    what = out / "native_pytorch_model.pt" if target_format == "native" else out
    assert str(caught.value).startswith(
        f"another tune command (a merge or a conversion) is writing {what} right now (its "
        f"temporary .{what.name}.")
    assert str(caught.value).endswith(" is in use): wait for it to finish, or write to another "
                                      "path")
    if target_format == "native":  # the first one finished undisturbed
        assert (out / "native_pytorch_model.pt").read_bytes() == b"the first merge's bytes"
    # and once it has, the same merge runs (a killed writer's temporaries are cleaned up)
    merge_adapter(base, adapter, out, target_format=target_format, force=True, progress=False)


# ------------------------------------------------------------------- links planted at outputs
def _plant(folder: Path, names: list[str], victim: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).unlink(missing_ok=True)
        os.symlink(victim, folder / name)


def _replaced(folder: Path, names: list[str], victim: Path, content: bytes) -> None:
    assert victim.read_bytes() == content, "a write went through a planted link"
    for name in names:
        assert (folder / name).is_file() and not (folder / name).is_symlink(), name


@pytest.fixture
def victim(tmp_path) -> tuple[Path, bytes]:
    path = tmp_path / "elsewhere" / "precious.txt"
    path.parent.mkdir()
    path.write_bytes(b"the user's own file\n")
    return path, path.read_bytes()


@pytest.mark.parametrize("target, names", [
    ("native", ["native_pytorch_model.pt", "tune_model.json"]),
    ("hf", ["model.safetensors", "config.json", "generation_config.json"]),
    ("meta", ["consolidated.00.pth", "params.json"]),
])
def test_convert_replaces_links_planted_at_its_output_names(base, tmp_path, victim, target,
                                                            names):
    path, content = victim
    out = tmp_path / "out"
    _plant(out, names, path)
    if target == "native":
        convert(base, output_path=out / names[0], force=True, progress=False)
    else:
        convert(base, target_format=target, output_path=out, force=True, progress=False)
    _replaced(out, names, path, content)


@pytest.mark.parametrize("target, names", [
    ("native", ["native_pytorch_model.pt", "tune_model.json"]),
    ("hf", ["model.safetensors", "config.json", "generation_config.json"]),
])
def test_merge_replaces_links_planted_at_its_output_names(base, adapter, tmp_path, victim,
                                                          target, names):
    path, content = victim
    out = tmp_path / "merged"
    _plant(out, names, path)
    merge_adapter(base, adapter, out, target_format=target, force=True, progress=False)
    _replaced(out, names, path, content)


def test_adapters_sidecars_and_native_saves_replace_planted_links(tmp_path, victim):
    path, content = victim
    model = _model()
    apply_lora(model, rank=2, alpha=4, targets=["q"])
    names = ["adapter_model.safetensors", "adapter_config.json", "tune_adapter.json"]
    _plant(tmp_path / "adapter", names, path)
    save_peft_adapter(tmp_path / "adapter", lora_state_dict(model), config=CONFIG,
                      settings=lora_settings(model), force=True)
    _replaced(tmp_path / "adapter", names, path, content)
    names = ["native_pytorch_model.safetensors", "tune_model.json"]
    _plant(tmp_path / "native", names, path)
    save_native(_model().state_dict(), tmp_path / "native" / names[0])
    write_model_args(tmp_path / "native", CONFIG, family="llama2")
    _replaced(tmp_path / "native", names, path, content)
