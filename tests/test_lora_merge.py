"""`tune merge` and tune_ckpt.merge_adapter: a base checkpoint plus an adapter folder become one
model with the adapted model's logits, native or Hugging Face; a QLoRA adapter is merged into
the NF4-dequantised base it was trained on; bad input is one line."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_reference import family_twins, hf_and_native

from tune_ckpt import (
    CheckpointError,
    load_native,
    merge_adapter,
    read_model_args,
    save_native,
    save_peft_adapter,
)
from tune_models import (
    Decoder,
    DecoderConfig,
    apply_lora,
    lora_settings,
    lora_state_dict,
    quantize_base,
)

TWINS = family_twins(vocab_size=128)
TUNE = str(Path(sys.executable).with_name("tune"))


def _base_and_adapter(tmp_path: Path, family: str, quantize: bool = False,
                      dtype: torch.dtype = torch.float32):
    """Write a native base and an adapter folder; return the adapted model (the reference)."""
    config, architecture = TWINS[family]
    _, model = hf_and_native(config, 0, architecture)
    model = model.to(dtype)
    base = save_native(model.state_dict(), tmp_path / "base" / "native_pytorch_model.pt",
                       model_args=dataclasses.asdict(config))
    targets = ["q", "v", "o", "down"] + ([] if config.tie_embeddings else ["output"])
    apply_lora(model, rank=4, alpha=8, targets=targets)
    if quantize:
        quantize_base(model, "nf4")
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_b" in name:
                p.normal_(0, 0.05)
    adapter = save_peft_adapter(tmp_path / "adapter", lora_state_dict(model), config=config,
                                settings=lora_settings(model),
                                quantize_base="nf4" if quantize else None)
    return base, adapter, model.eval()


def _load(path: Path) -> Decoder:
    with torch.device("meta"):
        model = Decoder(DecoderConfig(**read_model_args(path)))
    model.load_state_dict(load_native(path), strict=True, assign=True)
    return model.eval()


def _tokens(config) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (2, 50), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("family", list(TWINS))
def test_merged_native_checkpoint_gives_base_plus_adapter_logits(family, tmp_path):
    base, adapter, adapted = _base_and_adapter(tmp_path, family)
    before = base.read_bytes()
    out = merge_adapter(base, adapter, tmp_path / "merged", progress=False)
    assert out == tmp_path / "merged" / "native_pytorch_model.pt"
    assert (tmp_path / "merged" / "tune_model.json").is_file()
    tokens = _tokens(adapted.config)
    with torch.no_grad():
        torch.testing.assert_close(_load(out)(tokens), adapted(tokens), atol=1e-5, rtol=0)
    assert base.read_bytes() == before  # the base is read, never written


@pytest.mark.parametrize("family", ["llama2", "qwen3", "gemma3"])
def test_merged_hf_export_loads_in_transformers_with_equal_logits(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    base, adapter, adapted = _base_and_adapter(tmp_path, family)
    out = merge_adapter(base, adapter, tmp_path / "hf", target_format="hf", progress=False)
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = _tokens(adapted.config)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, adapted(tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama2", "qwen2", "gemma3"])
def test_a_qlora_adapter_merges_into_the_dequantised_base(family, tmp_path):
    base, adapter, qlora = _base_and_adapter(tmp_path, family, quantize=True)
    merged = _load(merge_adapter(base, adapter, tmp_path / "merged", progress=False))
    tokens = _tokens(qlora.config)
    with torch.no_grad():
        expected = qlora(tokens)
        torch.testing.assert_close(merged(tokens), expected, atol=1e-5, rtol=0)
        # Merged into the original float base instead, the logits would be off by the NF4
        # rounding of every block: the merge did dequantise.
        float_base = _load(base)
        apply_lora(float_base, rank=4, alpha=8, targets=lora_settings(qlora).targets)
        float_base.load_state_dict(lora_state_dict(qlora), strict=False)
        assert (float_base(tokens) - expected).abs().max() > 1e-3


def test_merging_a_bf16_base_keeps_bf16_and_casts_on_request(tmp_path):
    base, adapter, _ = _base_and_adapter(tmp_path, "mistral", dtype=torch.bfloat16)
    kept = load_native(merge_adapter(base, adapter, tmp_path / "a.safetensors", progress=False))
    assert {t.dtype for t in kept.values()} == {torch.bfloat16}
    cast = load_native(merge_adapter(base, adapter, tmp_path / "b.pt", dtype="fp32",
                                     progress=False))
    assert {t.dtype for t in cast.values()} == {torch.float32}
    assert all(torch.equal(cast[k].to(torch.bfloat16), kept[k]) for k in kept)


def _tune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TUNE, *map(str, args)], capture_output=True, text=True, timeout=300)


def _one_line(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_tune_merge_writes_and_refuses_bad_input_in_one_line(tmp_path):
    base, adapter, adapted = _base_and_adapter(tmp_path, "llama2")
    done = _tune("merge", "--checkpoint", base.parent, "--adapter", adapter, "-o",
                 tmp_path / "merged")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"Wrote the merged model (native) to {tmp_path / 'merged'}" in done.stdout
    tokens = _tokens(adapted.config)
    merged = _load(tmp_path / "merged" / "native_pytorch_model.pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), adapted(tokens), atol=1e-5, rtol=0)
    written = (tmp_path / "merged" / "native_pytorch_model.pt").read_bytes()

    # An adapter of another base (a Mistral-shaped one: dim 64, not 96).
    other_base, other_adapter, _ = _base_and_adapter(tmp_path / "other", "mistral")
    _one_line(_tune("merge", "--checkpoint", base, "--adapter", other_adapter, "-o",
                    tmp_path / "x"),
              "is an adapter of another base model: its dim is 64, this base model's is 96")
    _one_line(_tune("merge", "--checkpoint", base, "--adapter", adapter, "-o",
                    tmp_path / "merged"), "already exists: pass --force")
    _one_line(_tune("merge", "--checkpoint", base, "--adapter", adapter, "-o", base.parent,
                    "--force"), "is the base checkpoint")
    assert (tmp_path / "merged" / "native_pytorch_model.pt").read_bytes() == written
    assert not (tmp_path / "x").exists()


def test_merge_adapter_refuses_an_adapter_that_does_not_fit_before_writing(tmp_path):
    base, adapter, _ = _base_and_adapter(tmp_path, "qwen2")
    config = TWINS["qwen2"][0]
    _, other = hf_and_native(dataclasses.replace(config, n_layers=3), 0, "qwen2")
    apply_lora(other, rank=4, alpha=8, targets=["q"])
    deeper = save_peft_adapter(tmp_path / "deeper", lora_state_dict(other),
                               config=other.config, settings=lora_settings(other))
    llama2_base, _, _ = _base_and_adapter(tmp_path / "llama2", "llama2")
    _, other_adapter, _ = _base_and_adapter(tmp_path / "other", "mistral")
    (other_adapter / "tune_adapter.json").unlink()  # as from another tool: no sidecar
    (tmp_path / "empty").mkdir()
    for checkpoint, folder, message in [
        (base, deeper, "its n_layers is 3, this base model's is 2"),
        (llama2_base, other_adapter, "the adapter was trained on another base model"),
        (base, other_adapter, "LoRA target 'output' needs a separate output matrix"),
        (base, tmp_path / "missing", "adapter folder .*missing does not exist"),
        (base, tmp_path / "empty", "holds no adapter_config.json"),
        (tmp_path / "nope.pt", adapter, "base checkpoint .*nope.pt does not exist"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            merge_adapter(checkpoint, folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 7)  # a cut-off download
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        merge_adapter(base, adapter, tmp_path / "out", progress=False)


def test_an_fp32_adapter_on_a_bf16_base_is_merged_at_full_precision(tmp_path):
    base, _, _ = _base_and_adapter(tmp_path, "llama2", dtype=torch.bfloat16)
    config = TWINS["llama2"][0]
    model = _load(base).float()
    apply_lora(model, rank=4, alpha=8, targets=["v"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_b" in name:
                p.normal_(0, 1e-3)  # a change smaller than bf16 resolves in A and B alone
    adapter = save_peft_adapter(tmp_path / "fp32", lora_state_dict(model), config=config,
                                settings=lora_settings(model))
    merged = load_native(merge_adapter(base, adapter, tmp_path / "m.pt", progress=False))
    wqkv = model.layers[0].attention.wqkv
    expected = wqkv.weight.float().clone()
    rows = slice((config.n_heads + config.n_kv_heads) * config.head_dim, None)
    expected[rows] += 2.0 * wqkv.lora_b["v"] @ wqkv.lora_a["v"]
    assert torch.equal(merged["layers.0.attention.wqkv.weight"],
                       expected.to(torch.bfloat16))
