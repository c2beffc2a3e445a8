"""tune's LoRA adapters in Hugging Face PEFT's format, per family: transformers' model with
``PeftModel.from_pretrained(tune's exported adapter)`` gives tune's logits (fp32, 1e-5), for
LoRA and for QLoRA's adapter on the dequantised base; adapters PEFT made load into tune."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from hf_reference import family_twins, hf_and_native, native_to_hf_reference
from safetensors.torch import load_file

from tune_ckpt import (
    CheckpointError,
    convert,
    load_peft_adapter,
    save_native,
    save_peft_adapter,
)
from tune_models import (
    Decoder,
    apply_lora,
    load_lora_state_dict,
    lora_settings,
    lora_state_dict,
    merge_lora,
    quantize_base,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TWINS = family_twins(vocab_size=128)
SEQ = 70  # past llama3's original context (48) and mistral's window (16)
ALL = ["q", "k", "v", "o", "gate", "up", "down", "output"]


def _targets(config) -> list[str]:
    return [t for t in ALL if not (t == "output" and config.tie_embeddings)]


def _adapt(model, config, seed: int = 1, quantize: bool = False):
    apply_lora(model, rank=4, alpha=8, dropout=0.05, targets=_targets(config))
    if quantize:
        quantize_base(model, "nf4")
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_b" in name:
                p.normal_(0, 0.05)  # random, non-zero: every adapter changes the logits
    return model.eval()


def _tokens(config) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (2, SEQ),
                         generator=torch.Generator().manual_seed(7))


def _peft_logits(hf, adapter_dir, tokens) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(hf, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("family", list(TWINS))
def test_peft_loads_tunes_adapter_with_tunes_logits(family, tmp_path):
    config, architecture = TWINS[family]
    hf, ours = hf_and_native(config, 0, architecture)
    _adapt(ours, config)
    save_peft_adapter(tmp_path, lora_state_dict(ours), config=config,
                      settings=lora_settings(ours), base_model="org/base-model")
    tokens = _tokens(config)
    with torch.no_grad():
        expected = ours(tokens)
    torch.testing.assert_close(_peft_logits(hf, tmp_path, tokens), expected, atol=1e-5, rtol=0)

    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: written[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout",
                                    "bias", "fan_in_fan_out", "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "lora_dropout": 0.05, "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": "org/base-model"}
    hf_names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert written["target_modules"] == hf_names + ([] if config.tie_embeddings else ["lm_head"])
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (
        config.n_kv_heads * config.head_dim, 4)
    assert len(keys) == len(lora_state_dict(ours))  # one PEFT tensor per native one
    assert not any("norm" in k for k in keys)  # QK-norm and the other norms are not adapted


@pytest.mark.parametrize("family", list(TWINS))
def test_qlora_adapter_on_the_dequantised_base_gives_the_qlora_logits(family, tmp_path):
    config, architecture = TWINS[family]
    _, ours = hf_and_native(config, 0, architecture)
    _adapt(ours, config, quantize=True)
    save_peft_adapter(tmp_path, lora_state_dict(ours), config=config,
                      settings=lora_settings(ours), quantize_base="nf4")
    # The dequantised base: merging with every B at zero only dequantises.
    base = copy.deepcopy(ours)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if ".lora_b" in name:
                p.zero_()
    dequantised = merge_lora(base).state_dict()
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**_hf_config_dict(config, architecture)),
        attn_implementation="sdpa").eval()
    hf.load_state_dict(native_to_hf_reference(dequantised, config.n_layers, config.n_heads,
                                              config.n_kv_heads, tied=config.tie_embeddings))
    tokens = _tokens(config)
    with torch.no_grad():
        expected = ours(tokens)
    torch.testing.assert_close(_peft_logits(hf, tmp_path, tokens), expected, atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "tune_adapter.json").read_text())["quantize_base"] == "nf4"


def _hf_config_dict(config, architecture: str) -> dict:
    from hf_reference import hf_config

    return hf_config(config, architecture).to_dict()


@pytest.mark.parametrize("family", list(TWINS))
def test_through_tune_ckpts_hf_export_of_the_base(family, tmp_path):
    """The base goes to transformers the way a user's does: tune's native checkpoint, then
    tune-ckpt's converter, then from_pretrained; the adapter through PEFT."""
    config, architecture = TWINS[family]
    _, ours = hf_and_native(config, 0, architecture)
    native = save_native(ours.state_dict(), tmp_path / "base" / "native_pytorch_model.pt",
                         model_args=dataclasses.asdict(config))
    try:
        export = convert(native, target_format="hf", output_path=tmp_path / "hf", progress=False)
    except CheckpointError as e:
        pytest.skip(f"tune-ckpt does not export {family} to Hugging Face yet: {e}")
    hf = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    tokens = _tokens(config)
    with torch.no_grad():
        base_gap = (hf(tokens).logits - ours.eval()(tokens)).abs().max().item()
    if base_gap > 1e-5:  # the converter's parity is tested with the converter
        pytest.skip(f"tune-ckpt's HF export of the {family} base does not reproduce it yet "
                    f"(logits differ by {base_gap:.2g} before any adapter)")
    _adapt(ours, config)
    save_peft_adapter(tmp_path / "adapter", lora_state_dict(ours), config=config,
                      settings=lora_settings(ours))
    with torch.no_grad():
        expected = ours(tokens)
    torch.testing.assert_close(_peft_logits(hf, tmp_path / "adapter", tokens), expected,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("family, rslora", [("llama2", False), ("llama3_1", True),
                                            ("mistral", False), ("qwen2", True),
                                            ("qwen3", False), ("gemma3", True)])
def test_an_adapter_peft_made_loads_into_tune_with_equal_logits(family, rslora, tmp_path):
    config, architecture = TWINS[family]
    hf, ours = hf_and_native(config, 0, architecture)
    hf_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if not config.tie_embeddings:
        hf_targets.append("lm_head")
    torch.manual_seed(3)
    # init_lora_weights=False: A and B both random, so every adapter matters.
    lora = peft.LoraConfig(r=4, lora_alpha=16, target_modules=hf_targets, lora_dropout=0.1,
                           init_lora_weights=False, use_rslora=rslora, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(copy.deepcopy(hf), lora).eval()
    with torch.no_grad():  # PEFT's random B is as large as A; trained ones are far smaller
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    peft_model.save_pretrained(tmp_path)
    tokens = _tokens(config)
    with torch.no_grad():
        expected = peft_model(tokens).logits

    adapter = load_peft_adapter(tmp_path, config)
    assert adapter.settings.rank == 4 and adapter.settings.dropout == 0.1
    assert adapter.settings.targets == tuple(_targets(config))
    assert adapter.quantize_base is None and adapter.base_model_args is None
    s = adapter.settings
    apply_lora(ours, rank=s.rank, alpha=s.alpha, dropout=s.dropout, targets=s.targets)
    load_lora_state_dict(ours, adapter.weights)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(tokens), expected, atol=1e-5, rtol=0)

    # And back out: tune's export of what it loaded gives PEFT's tensors, bit for bit.
    save_peft_adapter(tmp_path / "again", lora_state_dict(ours), config=config,
                      settings=lora_settings(ours))
    theirs, mine = (load_file(p / "adapter_model.safetensors") for p in (tmp_path,
                                                                         tmp_path / "again"))
    theirs = {k: v for k, v in theirs.items() if ".base_layer." not in k}
    assert theirs.keys() == mine.keys()
    assert all(torch.equal(theirs[k], mine[k]) for k in mine)


def _peft_adapter(tmp_path, config, architecture, **lora_kwargs):
    hf, _ = hf_and_native(config, 0, architecture)
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
              "task_type": "CAUSAL_LM", **lora_kwargs}
    peft.get_peft_model(hf, peft.LoraConfig(**kwargs)).save_pretrained(tmp_path)
    return tmp_path


def test_adapters_tune_cannot_use_are_refused_in_one_line(tmp_path):
    config, architecture = TWINS["llama2"]
    other, _ = TWINS["mistral"]  # dim 64, not 96
    cases = [
        (_peft_adapter(tmp_path / "dora", config, architecture, use_dora=True),
         config, "use_dora = True is a PEFT feature tune's LoRA layers do not have"),
        (_peft_adapter(tmp_path / "embed", config, architecture,
                       target_modules=["q_proj", "embed_tokens"]),
         config, "adapts a module tune cannot"),
        (_peft_adapter(tmp_path / "other", config, architecture),
         other, r"has shape \(4, 96\), the base model needs \(4, 64\): the adapter was trained "
                "on another base model"),
        (_peft_adapter(tmp_path / "pattern", config, architecture, rank_pattern={"q_proj": 8}),
         config, "rank_pattern"),
        (tmp_path / "nothing", config, "adapter folder .* does not exist"),
    ]
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", config, "holds no adapter_config.json"))
    fewer = dataclasses.replace(config, n_layers=2)
    cases.append((tmp_path / "other", fewer, "is not an adapter of a module of this base model "
                                             r"\(2 layers"))
    more = dataclasses.replace(config, n_layers=4)
    cases.append((tmp_path / "other", more, "no weights for 'base_model.model.model.layers.3"))
    for folder, base, message in cases:
        with pytest.raises(CheckpointError, match=message) as error:
            load_peft_adapter(folder, base)
        assert "\n" not in str(error.value), str(error.value)

    # tune's own adapters say which base they belong to.
    _, ours = hf_and_native(other, 0, "mistral")
    _adapt(ours, other)
    save_peft_adapter(tmp_path / "tune", lora_state_dict(ours), config=other,
                      settings=lora_settings(ours))
    with pytest.raises(CheckpointError, match="is an adapter of another base model: its dim is "
                                              "64, this base model's is 96"):
        load_peft_adapter(tmp_path / "tune", config)
    with pytest.raises(CheckpointError, match="already holds an adapter: pass --force"):
        save_peft_adapter(tmp_path / "tune", lora_state_dict(ours), config=other,
                          settings=lora_settings(ours))
    other_peft = json.loads((tmp_path / "other" / "adapter_config.json").read_text())
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(
        json.dumps({**other_peft, "peft_type": "IA3"}))
    (tmp_path / "ia3" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "other" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="describes a 'IA3' adapter; tune loads LoRA"):
        load_peft_adapter(tmp_path / "ia3", config)


def test_an_interrupted_export_leaves_the_previous_adapter(tmp_path, monkeypatch):
    config, architecture = TWINS["llama2"]
    _, ours = hf_and_native(config, 0, architecture)
    _adapt(ours, config)
    folder = save_peft_adapter(tmp_path / "adapter", lora_state_dict(ours), config=config,
                               settings=lora_settings(ours))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    import tune_ckpt.adapters as adapters

    def disk_full(*args, **kwargs):
        raise CheckpointError("no space left on device")

    monkeypatch.setattr(adapters, "write_text_atomic", disk_full)
    with torch.no_grad():
        for p in lora_state_dict(ours).values():
            p.add_(1.0)
    with pytest.raises(CheckpointError, match="no space"):
        save_peft_adapter(folder, lora_state_dict(ours), config=config,
                          settings=lora_settings(ours), force=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging folder left


def test_the_model_built_from_the_adapter_folder_is_a_decoder_again(tmp_path):
    """load -> apply -> merge gives a plain Decoder whose state dict is the native schema."""
    config, architecture = TWINS["qwen2"]
    _, ours = hf_and_native(config, 0, architecture)
    _adapt(ours, config)
    save_peft_adapter(tmp_path, lora_state_dict(ours), config=config,
                      settings=lora_settings(ours))
    adapter = load_peft_adapter(tmp_path, config)
    assert all(torch.equal(adapter.weights[k], v) for k, v in lora_state_dict(ours).items())
    assert adapter.base_model_args["qkv_bias"] is True
    merged = merge_lora(ours)
    assert set(merged.state_dict()) == set(Decoder(config).state_dict())
