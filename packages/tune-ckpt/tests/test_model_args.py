"""A checkpoint's model: tune_model.json, Meta's params.json and HF's config.json, per family."""

import dataclasses
import json

import pytest
import torch

from tune_ckpt import (
    CheckpointError,
    load_native,
    read_model_args,
    read_model_family,
    save_native,
    write_model_args,
)
from tune_ckpt.hf_config import config_from_hf, hf_config_for
from tune_ckpt.meta_params import config_from_meta, meta_params_for
from tune_models import (
    DecoderConfig,
    llama2_7b,
    llama2_13b,
    llama2_70b,
    llama3_1_8b,
    llama3_1_70b,
    llama3_2_1b,
    llama3_2_3b,
    mistral_7b,
    qwen2_5_0_5b,
    qwen2_5_7b,
)

# Meta's params.json of each release, as published (Llama 2's says vocab_size -1).
LLAMA = {"norm_eps": 1e-05, "multiple_of": 256}
LLAMA3 = {"n_kv_heads": 8, "norm_eps": 1e-05, "rope_theta": 500000.0, "vocab_size": 128256}
META_PARAMS = {
    "llama2_7b": ({**LLAMA, "dim": 4096, "n_heads": 32, "n_layers": 32, "vocab_size": -1},
                  llama2_7b),
    "llama2_13b": ({**LLAMA, "dim": 5120, "n_heads": 40, "n_layers": 40, "vocab_size": -1},
                   llama2_13b),
    "llama2_70b": ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3,
                    "n_heads": 64, "n_kv_heads": 8, "n_layers": 80, "norm_eps": 1e-05,
                    "vocab_size": -1}, llama2_70b),
    "llama3_1_8b": ({**LLAMA3, "dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024,
                     "n_heads": 32, "n_layers": 32, "use_scaled_rope": True}, llama3_1_8b),
    "llama3_1_70b": ({**LLAMA3, "dim": 8192, "ffn_dim_multiplier": 1.3, "multiple_of": 4096,
                      "n_heads": 64, "n_layers": 80, "use_scaled_rope": True}, llama3_1_70b),
    "llama3_2_1b": ({**LLAMA3, "dim": 2048, "ffn_dim_multiplier": 1.5, "multiple_of": 256,
                     "n_heads": 32, "n_layers": 16, "use_scaled_rope": True}, llama3_2_1b),
    "llama3_2_3b": ({**LLAMA3, "dim": 3072, "ffn_dim_multiplier": 1.0, "multiple_of": 256,
                     "n_heads": 24, "n_layers": 28, "use_scaled_rope": True}, llama3_2_3b),
}


def _sizes(config: DecoderConfig) -> dict:
    # Presets give the FFN width itself; params.json gives Meta's rule's inputs.
    return {k: v for k, v in vars(config).items() if k not in ("multiple_of", "ffn_dim_multiplier")}


@pytest.mark.parametrize("name", list(META_PARAMS))
def test_meta_params_of_every_release_give_its_preset(name):
    params, preset = META_PARAMS[name]
    expected = preset()
    config, family = config_from_meta(params, vocab_size=32000,
                                      tie_embeddings=expected.tie_embeddings)
    assert _sizes(config) == _sizes(expected)
    assert family == name[:6]
    # ... and a params.json written for the preset reads back as the same model.
    again, _ = config_from_meta(meta_params_for(expected),
                                tie_embeddings=expected.tie_embeddings)
    assert _sizes(again) == _sizes(expected)


def test_rope_scaling_factor_comes_from_params_when_it_says_so():
    params = {**META_PARAMS["llama3_1_8b"][0], "rope_scaling_factor": 16.0}
    config, _ = config_from_meta(params)
    assert config.rope_scaling["factor"] == 16.0
    assert meta_params_for(config)["rope_scaling_factor"] == 16.0
    assert "rope_scaling_factor" not in meta_params_for(llama3_1_8b())
    llama3_0 = {k: v for k, v in params.items() if k not in ("use_scaled_rope",
                                                             "rope_scaling_factor")}
    config, family = config_from_meta(llama3_0)
    assert (config.rope_scaling, config.max_seq_len, family) == (None, 8192, "llama3")


def test_params_json_cannot_hold_another_rope_scaling():
    config = dataclasses.replace(llama3_1_8b(), rope_scaling={
        **llama3_1_8b().rope_scaling, "original_max_position_embeddings": 4096})
    with pytest.raises(CheckpointError, match="Meta's params.json cannot hold rope_scaling .* "
                       "original_max_position_embeddings 8192; convert --to hf instead"):
        meta_params_for(config)


def test_sidecar_wins_over_params_and_config_and_keeps_the_family(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4,
                                                      "vocab_size": 10}))
    (tmp_path / "config.json").write_text("{}")
    args = {"vocab_size": 10, "dim": 64, "n_layers": 3, "n_heads": 4, "rope_theta": 1e6}
    path = write_model_args(tmp_path, args, family="mistral")
    assert path == tmp_path / "tune_model.json"
    assert json.loads(path.read_text())["family"] == "mistral"
    assert read_model_args(tmp_path / "native_pytorch_model.pt") == vars(DecoderConfig(**args))
    assert read_model_family(tmp_path) == "mistral"


def test_a_sidecar_without_a_family_gets_the_likeliest(tmp_path):
    """tune_model.json of older tune (and of training runs) holds the config only."""
    for config, family in [(llama2_7b(), "llama2"), (llama3_2_1b(), "llama3"),
                           (mistral_7b(), "mistral"), (qwen2_5_0_5b(), "qwen2")]:
        write_model_args(tmp_path, vars(config))
        assert read_model_family(tmp_path) == family


# transformers' config.json of each family, as the Hub holds them (4.x spelling).
HF_CONFIGS = {
    "llama3_2_1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
        "hidden_act": "silu", "torch_dtype": "bfloat16"},
    "mistral_7b": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
        "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16"},
    "qwen2_5_7b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064,
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 131072,
        "max_window_layers": 28, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 131072, "use_sliding_window": False, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "bfloat16"},
}
PRESETS = {"llama3_2_1b": llama3_2_1b, "mistral_7b": mistral_7b, "qwen2_5_7b": qwen2_5_7b}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hub_config_json_of_every_family_gives_its_preset(name):
    config, family = config_from_hf(HF_CONFIGS[name])
    assert config == PRESETS[name]()
    assert family == {"llama3_2_1b": "llama3", "mistral_7b": "mistral",
                      "qwen2_5_7b": "qwen2"}[name]
    # What tune writes reads back as the same model (the 5.x spelling is read too).
    written = hf_config_for(config, family, "bfloat16")
    assert config_from_hf(written) == (config, family)
    v5 = {k: v for k, v in written.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_theta": config.rope_theta,
                             **(config.rope_scaling or {"rope_type": "default"})}
    assert config_from_hf(v5) == (config, family)


def test_llama_config_json_family_is_told_by_vocabulary_or_rope_scaling():
    base = {k: v for k, v in HF_CONFIGS["llama3_2_1b"].items() if k != "rope_scaling"}
    assert config_from_hf(base)[1] == "llama3"  # Llama 3.0: 128256 tokens, no scaling
    assert config_from_hf({**base, "vocab_size": 32000})[1] == "llama2"
    assert config_from_hf({**HF_CONFIGS["llama3_2_1b"], "vocab_size": 500})[1] == "llama3"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
         "architecture 'GPT2LMHeadModel' is not supported; tune converts LlamaForCausalLM, "
         "MistralForCausalLM, Qwen2ForCausalLM"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                           "original_max_position_embeddings": 32768}},
         "rope_scaling type 'yarn' is not supported (tune implements llama3, linear); this "
         "model cannot be converted"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}},
         "rope_scaling type 'dynamic' is not supported"),
        ({"attention_bias": True}, "attention_bias is true (a bias on o_proj too)"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not silu"),
        ({"num_attention_heads": 7}, "n_heads (7) must be divisible by n_kv_heads (8)"),
        ({"hidden_size": "2048"}, "'hidden_size' must be a positive integer, got '2048'"),
    ],
)
def test_hf_configs_tune_cannot_run_are_one_line(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps({**HF_CONFIGS["llama3_2_1b"], **change}))
    with pytest.raises(CheckpointError) as e:
        read_model_args(tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(str(tmp_path / "config.json"))


def test_qwen2_with_its_sliding_window_on_is_refused():
    config = {**HF_CONFIGS["qwen2_5_7b"], "use_sliding_window": True}
    with pytest.raises(CheckpointError, match="use_sliding_window is true .* does not implement"):
        config_from_hf(config)


def test_a_family_whose_architecture_cannot_hold_the_model_is_refused_on_export():
    with pytest.raises(CheckpointError, match=r"cannot write a llama3 \(LlamaForCausalLM\) "
                       "config.json: the model has q/k/v biases and LlamaForCausalLM has none"):
        hf_config_for(qwen2_5_7b(), "llama3", "bfloat16")


def test_no_description_and_bad_fields_are_explained(tmp_path):
    with pytest.raises(CheckpointError, match="no tune_model.json, params.json or config.json"):
        read_model_args(tmp_path)
    with pytest.raises(CheckpointError, match="unknown field 'n_head'"):
        write_model_args(tmp_path, {"vocab_size": 10, "dim": 64, "n_layers": 1, "n_head": 4})
    with pytest.raises(CheckpointError, match="'dim' must be a positive integer, got '64'"):
        write_model_args(tmp_path, {"vocab_size": 10, "dim": "64", "n_layers": 1, "n_heads": 4})
    with pytest.raises(CheckpointError, match="unknown model family 'llama4'"):
        write_model_args(tmp_path, {"vocab_size": 10, "dim": 64, "n_layers": 1, "n_heads": 4},
                         family="llama4")
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4,
                                                      "vocab_size": -1}))
    with pytest.raises(CheckpointError, match="vocab_size is -1 and no checkpoint"):
        read_model_args(tmp_path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_native_writes_atomically_and_load_native_maps_it(tmp_path, suffix):
    sd = {"tok_embeddings.weight": torch.randn(10, 4), "norm.weight": torch.rand(4)}
    config = DecoderConfig(vocab_size=10, dim=4, n_layers=1, n_heads=2)
    path = save_native(sd, tmp_path / f"native_pytorch_model{suffix}", model_args=config,
                       family="llama2")
    save_native(sd, path)  # replacing a checkpoint is allowed, like torch.save
    loaded = load_native(tmp_path)  # the folder finds native_pytorch_model.*
    assert all(torch.equal(loaded[k], sd[k]) for k in sd) and list(loaded) == list(sd)
    assert read_model_args(path) == vars(config)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, "tune_model.json"]
    with pytest.raises(CheckpointError, match=r"must end in \.pt or \.safetensors"):
        save_native(sd, tmp_path / "model.bin")
