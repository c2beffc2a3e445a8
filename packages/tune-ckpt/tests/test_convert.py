"""Conversion between Meta, Hugging Face and native files, through the streaming writer."""

import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tune_ckpt import (
    CheckpointError,
    convert,
    hf_to_native,
    load_native,
    merge_meta_shards,
    meta_to_native,
    native_to_hf,
    native_to_meta,
    read_model_args,
)
from tune_models import DecoderConfig

from fixtures_hub import meta_state_dict, write_meta_checkpoint

# Grouped-query (like 70B) and small: 8 query heads share 2 KV heads.
GQA = {"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "multiple_of": 32,
       "norm_eps": 1e-05, "vocab_size": -1}
VOCAB = 96
TUNE_CKPT = Path(sys.executable).with_name("tune-ckpt")  # the installed console script


def _equal(a: dict, b: dict) -> None:
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture
def meta_dir(tmp_path):
    folder = tmp_path / "llama"
    return folder, write_meta_checkpoint(folder, GQA, vocab_size=VOCAB, dtype=torch.bfloat16)


def test_round_trip_meta_native_hf_native_meta_is_bit_identical(meta_dir):
    folder, reference = meta_dir
    native = convert(folder / "consolidated.00.pth", progress=False)
    hf = convert(native, target_format="hf", max_shard_size="40KB", progress=False)
    assert (hf / "model.safetensors.index.json").is_file(), "small shards make an index"
    again = convert(hf, output_path=hf / "native.safetensors", progress=False)
    # Copied tensors are laid out in source order, not key order: the library must agree.
    from safetensors.torch import load_file

    _equal(load_file(again), load_native(native))
    meta = convert(again, target_format="meta", progress=False)
    back = torch.load(meta / "consolidated.00.pth", weights_only=True, mmap=True)
    _equal(back, reference)  # rope.freqs is the one key dropped on the way
    _equal(load_native(again), load_native(native))
    params = json.loads((meta / "params.json").read_text())
    assert {k: params[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads")} == \
        {k: GQA[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads")}
    assert params["vocab_size"] == VOCAB
    ffn = {k: params[k] for k in ("multiple_of", "ffn_dim_multiplier") if k in params}
    assert DecoderConfig(dim=64, n_heads=8, **ffn).hidden_dim == 192


def test_plain_key_maps_are_inverse_and_fuse_qkv_in_order():
    sd = meta_state_dict(GQA, VOCAB)
    native = meta_to_native(sd, n_heads=8, n_kv_heads=2)
    p = "layers.1.attention."
    assert torch.equal(native[p + "wqkv.weight"],
                       torch.cat([sd[p + "wq.weight"], sd[p + "wk.weight"], sd[p + "wv.weight"]]))
    _equal(native_to_meta(native, n_heads=8, n_kv_heads=2), sd)
    hf = native_to_hf(native, n_heads=8, n_kv_heads=2)
    assert "model.layers.1.self_attn.k_proj.weight" in hf and len(hf) == len(sd)
    # HF's rotate-half rows: head 0's first half holds Meta's even rows.
    head = 64 // 8
    assert torch.equal(hf["model.layers.1.self_attn.q_proj.weight"][: head // 2],
                       sd[p + "wq.weight"][0:head:2])
    _equal(hf_to_native(hf, n_heads=8, n_kv_heads=2), native)


def test_model_parallel_shards_merge_to_the_unsharded_checkpoint(tmp_path):
    params = {**GQA, "n_kv_heads": 4}  # 4 shards need a KV head each
    reference = write_meta_checkpoint(tmp_path, params, n_shards=4, vocab_size=VOCAB)
    shards = [torch.load(tmp_path / f"consolidated.0{i}.pth", weights_only=True)
              for i in range(4)]
    _equal(merge_meta_shards(shards), reference)
    out = convert(tmp_path / "consolidated.02.pth", progress=False)  # any shard finds them all
    _equal(load_native(out), meta_to_native(reference, n_heads=8, n_kv_heads=4))


def test_llama3_shards_split_the_vocabulary_and_merge_back(tmp_path):
    """Llama 3's VocabParallelEmbedding splits the embedding's rows; params.json gives the
    vocabulary, so a shard's 1/n of it tells the split apart from Llama 2's columns."""
    params = {**GQA, "n_kv_heads": 4, "vocab_size": VOCAB, "rope_theta": 500000.0,
              "use_scaled_rope": True}
    reference = write_meta_checkpoint(tmp_path, params, n_shards=4, vocab_parallel=True)
    shards = [torch.load(tmp_path / f"consolidated.0{i}.pth", weights_only=True)
              for i in range(4)]
    assert shards[0]["tok_embeddings.weight"].shape == (VOCAB // 4, 64)
    _equal(merge_meta_shards(shards, vocab_size=VOCAB), reference)
    out = convert(tmp_path, progress=False)
    _equal(load_native(out), meta_to_native(reference, n_heads=8, n_kv_heads=4))
    assert read_model_args(out)["rope_scaling"]["factor"] == 32.0  # 64 wide: a Llama 3.2 size


def test_meta_defaults_output_path_and_writes_the_model_shape(meta_dir):
    folder, _ = meta_dir
    out = convert(folder / "consolidated.00.pth", progress=False)
    assert out == folder / "native_pytorch_model.pt"
    sidecar = json.loads((folder / "tune_model.json").read_text())
    expected = DecoderConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=8, n_kv_heads=2,
                             multiple_of=32)
    assert sidecar == {**vars(expected), "family": "llama2"}
    assert sidecar["hidden_dim"] == 192
    assert read_model_args(out) == vars(expected)


def test_pt_output_is_a_valid_torch_zip_with_aligned_tensors(meta_dir):
    folder, reference = meta_dir
    out = convert(folder, progress=False)
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None, "a CRC does not match"
    loaded = torch.load(out, mmap=True, weights_only=True)
    assert all(t.data_ptr() % 64 == 0 for t in loaded.values())
    _equal(loaded, meta_to_native(reference, n_heads=8, n_kv_heads=2))


def test_existing_output_is_kept_unless_force(meta_dir):
    folder, _ = meta_dir
    out = convert(folder, progress=False)
    before = out.read_bytes()
    with pytest.raises(CheckpointError, match="already exists: pass --force to overwrite it"):
        convert(folder, dtype="fp32", progress=False)
    assert out.read_bytes() == before
    convert(folder, dtype="fp32", force=True, progress=False)
    assert load_native(out)["norm.weight"].dtype == torch.float32


def test_force_replaces_an_earlier_export_whole_and_keeps_other_files(meta_dir):
    folder, _ = meta_dir
    native = convert(folder, progress=False)
    hf = convert(native, target_format="hf", max_shard_size="40KB", progress=False)
    assert len(list(hf.glob("model-*-of-*.safetensors"))) > 1
    (hf / "tokenizer.model").write_bytes(b"the user's tokenizer")
    with pytest.raises(CheckpointError, match="already exists: pass --force to overwrite it"):
        convert(native, target_format="hf", progress=False)
    convert(native, target_format="hf", force=True, progress=False)
    # One shard now: the earlier shards and their index would mislead a loader if left.
    assert sorted(p.name for p in hf.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.model"]
    assert (hf / "tokenizer.model").read_bytes() == b"the user's tokenizer"


def test_safetensors_output_with_dtype_cast_loads_with_the_safetensors_library(meta_dir):
    from safetensors.torch import load_file

    folder, reference = meta_dir
    out = convert(folder, output_path=folder / "model_fp32.safetensors", dtype="fp32",
                  progress=False)
    expected = {k: v.float() for k, v in meta_to_native(reference, n_heads=8, n_kv_heads=2).items()}
    _equal(load_file(out), expected)


def test_hf_bin_shards_with_index_and_tied_embeddings(tmp_path):
    native = meta_to_native(meta_state_dict(GQA, VOCAB), n_heads=8, n_kv_heads=2)
    del native["output.weight"]  # tied: the output projection reads the embedding
    hf = native_to_hf(native, n_heads=8, n_kv_heads=2)
    assert "lm_head.weight" not in hf  # as transformers saves a tied model
    keys = list(hf)
    parts = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
             "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
    for name, part in parts.items():
        torch.save({k: hf[k].clone() for k in part}, tmp_path / name)
    index = {"weight_map": {k: name for name, part in parts.items() for k in part}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    config = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64,
              "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 8,
              "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    _equal(load_native(convert(tmp_path, progress=False)), native)


def _break(folder: Path, edit) -> None:
    path = folder / "consolidated.00.pth"
    sd = torch.load(path, weights_only=True)
    edit(sd)
    torch.save(sd, path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("layers.1.feed_forward.w3.weight"),
         "missing key 'layers.1.feed_forward.w3.weight' of a Meta llama2 checkpoint with 2 layers "
         "(expected shape (192, 64))"),
        (lambda sd: sd.__setitem__("layers.0.attention.wq.bias", torch.zeros(64)),
         "unexpected key 'layers.0.attention.wq.bias' with shape (64,)"),
        (lambda sd: sd.__setitem__("layers.1.attention.wk.weight", torch.zeros(24, 64)),
         "'layers.1.attention.wk.weight' has shape (24, 64), expected (16, 64)"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_bad_keys_and_shapes_are_named(meta_dir, edit, message):
    folder, _ = meta_dir
    _break(folder, edit)
    with pytest.raises(CheckpointError) as e:
        convert(folder, progress=False)
    assert message in str(e.value) and "consolidated.00.pth" in str(e.value)
    assert not (folder / "native_pytorch_model.pt").exists()


def test_params_json_that_disagrees_with_the_weights(meta_dir):
    folder, _ = meta_dir
    (folder / "params.json").write_text(json.dumps({**GQA, "multiple_of": 256}))
    with pytest.raises(CheckpointError, match=r"'layers.0.feed_forward.w1.weight' has shape "
                       r"\(192, 64\), expected \(256, 64\)"):
        convert(folder, progress=False)


def test_missing_shard_and_missing_params(tmp_path):
    write_meta_checkpoint(tmp_path, GQA, n_shards=2, vocab_size=VOCAB)
    (tmp_path / "consolidated.00.pth").unlink()
    with pytest.raises(CheckpointError, match="shard consolidated.00.pth is missing"):
        convert(tmp_path / "consolidated.01.pth", progress=False)
    single = tmp_path / "single"
    write_meta_checkpoint(single, GQA, vocab_size=VOCAB)
    (single / "params.json").unlink()
    with pytest.raises(CheckpointError, match="params.json not found beside"):
        convert(single / "consolidated.00.pth", progress=False)


def test_truncated_and_non_tensor_files_are_refused(meta_dir, tmp_path):
    folder, _ = meta_dir
    path = folder / "consolidated.00.pth"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is truncated or corrupt"):
        convert(path, progress=False)
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        convert(path, source_format="meta", progress=False)
    torch.save({"model": {"w": torch.zeros(2)}, "optimizer": {}}, path)
    with pytest.raises(CheckpointError, match="looks like a training state"):
        convert(path, source_format="meta", progress=False)


def test_truncated_safetensors_is_refused(meta_dir):
    folder, _ = meta_dir
    out = convert(folder, output_path=folder / "model.safetensors", progress=False)
    data = out.read_bytes()
    out.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated: .* fetch it again"):
        load_native(out)


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickles_that_would_run_code_are_refused_and_not_run(meta_dir):
    folder, _ = meta_dir
    marker = folder / "pwned"
    torch.save({"tok_embeddings.weight": _RunsCode(str(marker))}, folder / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"refusing to load .* arbitrary Python objects"):
        convert(folder, progress=False)
    assert not marker.exists()


def test_a_failure_mid_write_leaves_no_partial_file(meta_dir):
    from tune_ckpt.plan import TensorPlan
    from tune_ckpt.writing import write_torch_file

    folder, _ = meta_dir
    target = folder / "out.pt"
    target.write_bytes(b"the user's file")

    def boom():
        raise CheckpointError("source went away")

    plans = [TensorPlan("a", (2,), torch.float32, lambda: torch.zeros(2)),
             TensorPlan("b", (2,), torch.float32, boom)]
    with pytest.raises(CheckpointError, match="source went away"):
        write_torch_file(target, plans, force=True, progress=False)
    assert target.read_bytes() == b"the user's file"
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []


def _cli(*args, **kwargs):
    return subprocess.run([str(TUNE_CKPT), *args], capture_output=True, text=True, timeout=120,
                          **kwargs)


def test_cli_convert_then_refuse_to_overwrite(meta_dir):
    folder, reference = meta_dir
    first = _cli("convert", "--checkpoint_path", str(folder / "consolidated.00.pth"))
    assert first.returncode == 0, first.stderr
    out = folder / "native_pytorch_model.pt"
    assert f"Wrote {out}" in first.stdout
    _equal(load_native(out), meta_to_native(reference, n_heads=8, n_kv_heads=2))
    again = _cli("convert", "--checkpoint-path", str(folder), "--to", "native")
    assert again.returncode == 1
    assert again.stderr.strip() == f"tune-ckpt: error: {out} already exists: pass --force to " \
                                   "overwrite it"


def test_cli_disk_full_is_one_line_and_leaves_nothing_behind(meta_dir):
    folder, _ = meta_dir
    before = sorted(p.name for p in folder.iterdir())

    def small_disk():  # files may not grow past 200 KB: the native file needs more
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    result = _cli("convert", "--checkpoint-path", str(folder), preexec_fn=small_disk)
    assert result.returncode == 1
    out = folder / "native_pytorch_model.pt"
    assert result.stderr.strip() == (
        f"tune-ckpt: error: could not write {out}: File too large; free some disk space or "
        "choose another output location (nothing was overwritten)"
    )
    assert sorted(p.name for p in folder.iterdir()) == before


def test_crc32_combine_matches_zlib():
    import zlib

    from tune_ckpt.writing import crc32_combine

    a, b = os.urandom(1000), os.urandom(70001)
    for x, y in [(b"", b""), (a, b""), (b"", b), (a, b), (b, a)]:
        assert crc32_combine(zlib.crc32(x), zlib.crc32(y), len(y)) == zlib.crc32(x + y)


@pytest.mark.parametrize("case", ["no kernel copy", "source without CRCs"])
def test_the_slow_paths_write_the_same_valid_file(meta_dir, monkeypatch, case):
    import errno

    folder, reference = meta_dir
    if case == "no kernel copy":  # e.g. a kernel or file system without copy_file_range
        def refuse(*args):
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    else:  # torch.save can skip CRCs; then they are computed from the data
        sd = torch.load(folder / "consolidated.00.pth", weights_only=True)
        torch.serialization.set_crc32_options(False)
        try:
            torch.save(sd, folder / "consolidated.00.pth")
        finally:
            torch.serialization.set_crc32_options(True)
        with zipfile.ZipFile(folder / "consolidated.00.pth") as zf:
            assert {i.CRC for i in zf.infolist() if "/data/" in i.filename} == {0}
    out = convert(folder, progress=False)
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None
    _equal(load_native(out), meta_to_native(reference, n_heads=8, n_kv_heads=2))


# A model big enough (~60 MB in fp32) that writing it takes a visible moment to kill into.
BIG = {"dim": 384, "n_layers": 8, "n_heads": 6, "n_kv_heads": 2, "multiple_of": 32,
       "norm_eps": 1e-05, "vocab_size": -1}


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> Path:
    """A Meta checkpoint and its native conversion (the source of the hf and meta exports)."""
    folder = tmp_path_factory.mktemp("big")
    write_meta_checkpoint(folder, BIG, vocab_size=4096)
    convert(folder, progress=False)
    return folder


def _litter(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name)


@pytest.mark.parametrize("target, source, output", [
    ("native", "consolidated.00.pth", "native_pytorch_model.pt"),
    ("hf", "native_pytorch_model.pt", "hf_model"),
    ("meta", "native_pytorch_model.pt", "meta_model"),
])
def test_a_convert_killed_mid_write_leaves_no_litter_and_a_plain_rerun_works(
        big_checkpoint, tmp_path, target, source, output):
    import shutil
    import time

    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("consolidated.00.pth", "params.json", "native_pytorch_model.pt",
                 "tune_model.json"):
        if not (target == "native" and name.startswith(("native", "tune"))):
            shutil.copy(big_checkpoint / name, folder / name)
    args = ["convert", "--checkpoint-path", str(folder / source), "--to", target,
            "--max-shard-size", "20MB", "--quiet"]
    for _ in range(10):  # the write must be caught in progress; a quick machine may need tries
        proc = subprocess.Popen([str(TUNE_CKPT), *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if any(p.name.startswith((f".{output}.", output)) for p in folder.iterdir()):
                proc.send_signal(signal.SIGKILL)  # the output is being written right now
                break
            time.sleep(0.0005)
        proc.wait()
        if proc.returncode == -signal.SIGKILL:
            break
        shutil.rmtree(folder / output, ignore_errors=True)
        (folder / output).unlink(missing_ok=True)
    assert proc.returncode == -signal.SIGKILL, "never caught the conversion writing"
    assert not (folder / output).exists(), "a kill left a partial output under the real name"

    rerun = _cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert _litter(folder) == [], "a killed write left temporary files behind"
    converted = convert(folder / output, target_format="native",
                        output_path=tmp_path / "again.pt", progress=False)
    _equal(load_native(converted), load_native(big_checkpoint / "native_pytorch_model.pt"))


def _hf_llama_folder(folder: Path) -> Path:
    """A tiny Llama in transformers' files (written by the converter from a Meta state dict)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    native = meta_to_native(meta_state_dict(GQA, VOCAB), n_heads=8, n_kv_heads=2)
    save_file(native_to_hf(native, n_heads=8, n_kv_heads=2), folder / "model.safetensors")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 192,
              "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("case", ["architecture", "another family's config", "rope_scaling",
                                  "native sidecar", "qwen2 to meta"])
def test_family_mistakes_are_one_line_and_write_nothing(tmp_path, case):
    hf = _hf_llama_folder(tmp_path / "hf")
    args, target = ["--checkpoint-path", str(hf)], hf / "native_pytorch_model.pt"
    if case == "architecture":
        _edit_json(hf / "config.json", architectures=["GPT2LMHeadModel"], model_type="gpt2")
        expected = (f"{hf / 'config.json'}: architecture 'GPT2LMHeadModel' is not supported; "
                    "tune converts LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
                    "Qwen3ForCausalLM, Gemma3ForCausalLM, Gemma3ForConditionalGeneration (its "
                    "text decoder)")
    elif case == "another family's config":  # Llama weights, Qwen2's config.json
        _edit_json(hf / "config.json", architectures=["Qwen2ForCausalLM"], model_type="qwen2")
        expected = (f"{hf / 'model.safetensors'}: missing key "
                    "'model.layers.0.self_attn.q_proj.bias' and 5 more of a Hugging Face qwen2 "
                    "checkpoint with 2 layers (expected shape (64,)) (the model as "
                    f"{hf / 'config.json'} describes it: check that it came with these weights)")
    elif case == "rope_scaling":
        _edit_json(hf / "config.json", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
        expected = (f"{hf / 'config.json'}: rope_scaling type 'dynamic' is not supported (tune "
                    "implements llama3, linear); this model cannot be converted")
    elif case == "native sidecar":  # tune_model.json of a Qwen2 beside Llama weights
        native = convert(hf, progress=False)
        _edit_json(native.parent / "tune_model.json", qkv_bias=True, family="qwen2")
        args, target = ["--checkpoint-path", str(native), "--to", "hf"], hf / "hf_model"
        expected = (f"{native}: missing key 'layers.0.attention.wqkv.bias' and 1 more of a "
                    "native qwen2 checkpoint with 2 layers (expected shape (96,)) (the model as "
                    f"{native.parent / 'tune_model.json'} describes it: check that it came with "
                    "these weights)")
    else:
        _edit_json(hf / "config.json", architectures=["Qwen2ForCausalLM"], model_type="qwen2")
        from safetensors.torch import load_file, save_file

        sd = load_file(hf / "model.safetensors")
        for i in range(2):
            for proj, rows in (("q", 64), ("k", 16), ("v", 16)):
                sd[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = torch.zeros(rows)
        save_file(sd, hf / "model.safetensors")
        args, target = ["--checkpoint-path", str(hf), "--to", "meta"], hf / "meta_model"
        expected = ("qwen2 has no Meta layout (Meta publishes no qwen2 checkpoints): convert it "
                    "--to hf or native instead")
    before = sorted(p.name for p in hf.iterdir())
    result = _cli("convert", *args)
    assert result.returncode == 1
    assert result.stderr == f"tune-ckpt: error: {expected}\n"
    assert not target.exists()
    assert sorted(p.name for p in hf.iterdir()) == before


def test_private_torch_names_the_pt_writer_uses():
    # STYLE 18: the streaming .pt writer pickles tensors with these two private torch names.
    # If a torch release moves one, this test says which; the writer then falls back to
    # torch.save (test_pt_writer_falls_back_to_torch_save_without_them).
    import importlib

    from tune_ckpt.writing import PRIVATE_TORCH_NAMES

    for name in PRIVATE_TORCH_NAMES:
        module, _, attr = name.rpartition(".")
        found = getattr(importlib.import_module(module), attr, None)
        assert callable(found), (
            f"torch {torch.__version__} has no {name}: tune_ckpt/writing.py's streaming .pt "
            "writer uses it to pickle tensors as torch.save does; update _private_torch_api "
            "(until then .pt files are written by torch.save, the whole state in memory)")
    storage_types = torch.storage._dtype_to_storage_type_map()
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64):
        assert isinstance(getattr(torch, storage_types[dtype]), type), dtype


def test_pt_writer_falls_back_to_torch_save_without_them(meta_dir, monkeypatch, tmp_path):
    from tune_ckpt import writing

    folder, reference = meta_dir
    with monkeypatch.context() as m:
        m.delattr(torch._utils, "_rebuild_tensor_v2")
        assert writing._private_torch_api() is None
    with monkeypatch.context() as m:
        m.delattr(torch.storage, "_dtype_to_storage_type_map")
        assert writing._private_torch_api() is None
    # Reading the source needs torch.load, and so the names: take them from the writer only.
    monkeypatch.setattr(writing, "_private_torch_api", lambda: None)
    out = convert(folder, output_path=tmp_path / "out" / "native_pytorch_model.pt",
                  progress=False)
    _equal(load_native(out), meta_to_native(reference, n_heads=8, n_kv_heads=2))
    assert sorted(p.name for p in out.parent.iterdir()) == ["native_pytorch_model.pt",
                                                            "tune_model.json"]


def test_casts_read_tune_models_one_dtype_map():
    from tune_ckpt.reading import parse_dtype
    from tune_models import DTYPES

    assert {name: parse_dtype(name) for name in DTYPES} == DTYPES
    assert parse_dtype("bfloat16") is torch.bfloat16  # config.json's spelling
    with pytest.raises(CheckpointError, match="^unknown dtype 'fp8': use one of fp32, bf16, "
                                              "fp16$"):
        parse_dtype("fp8")
