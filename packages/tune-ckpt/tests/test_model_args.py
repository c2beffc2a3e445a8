"""Model arguments: tune_model.json, Meta's params.json and HF's config.json."""

import json

import pytest
import torch

from tune_ckpt import (
    CheckpointError,
    load_native,
    meta_hidden_dim,
    read_model_args,
    save_native,
    write_model_args,
)


def test_meta_rule_gives_the_published_ffn_widths():
    assert meta_hidden_dim(4096, 256) == 11008  # 7B
    assert meta_hidden_dim(5120, 256) == 13824  # 13B
    assert meta_hidden_dim(8192, 4096, 1.3) == 28672  # 70B


def test_sidecar_wins_over_params_and_config(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4,
                                                      "vocab_size": 10}))
    (tmp_path / "config.json").write_text("{}")
    args = {"vocab_size": 10, "dim": 64, "n_layers": 3, "n_heads": 4, "rope_theta": 1e6}
    path = write_model_args(tmp_path, args)
    assert path == tmp_path / "tune_model.json"
    assert read_model_args(tmp_path / "native_pytorch_model.pt") == {
        **args, "n_kv_heads": 4, "hidden_dim": meta_hidden_dim(64)}


def test_hf_config_maps_to_llama2_names(tmp_path):
    config = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64,
              "intermediate_size": 200, "num_hidden_layers": 2, "num_attention_heads": 8,
              "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "max_position_embeddings": 256,
              "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_model_args(tmp_path) == {
        "vocab_size": 100, "dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4,
        "hidden_dim": 200, "norm_eps": 1e-6, "max_seq_len": 256, "rope_theta": 5e5}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling"),
        ({"model_type": "mistral"}, "model_type is 'mistral'; only 'llama'"),
        ({"attention_bias": True}, "attention_bias is true; Llama2 has no biases"),
    ],
)
def test_hf_configs_llama2_cannot_run_are_refused(tmp_path, change, message):
    config = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 200,
              "num_hidden_layers": 2, "num_attention_heads": 8, **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        read_model_args(tmp_path)


def test_no_description_and_bad_fields_are_explained(tmp_path):
    with pytest.raises(CheckpointError, match="no tune_model.json, params.json or config.json"):
        read_model_args(tmp_path)
    with pytest.raises(CheckpointError, match="unknown field 'n_head'"):
        write_model_args(tmp_path, {"vocab_size": 10, "dim": 64, "n_layers": 1, "n_head": 4})
    with pytest.raises(CheckpointError, match="'dim' must be a positive integer, got '64'"):
        write_model_args(tmp_path, {"vocab_size": 10, "dim": "64", "n_layers": 1, "n_heads": 4})
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4,
                                                      "vocab_size": -1}))
    with pytest.raises(CheckpointError, match="vocab_size is -1 and no checkpoint"):
        read_model_args(tmp_path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_native_writes_atomically_and_load_native_maps_it(tmp_path, suffix):
    sd = {"tok_embeddings.weight": torch.randn(10, 4), "norm.weight": torch.rand(4)}
    path = save_native(sd, tmp_path / f"native_pytorch_model{suffix}",
                       model_args={"vocab_size": 10, "dim": 4, "n_layers": 1, "n_heads": 2})
    save_native(sd, path)  # replacing a checkpoint is allowed, like torch.save
    loaded = load_native(tmp_path)  # the folder finds native_pytorch_model.*
    assert all(torch.equal(loaded[k], sd[k]) for k in sd) and list(loaded) == list(sd)
    assert read_model_args(path)["n_heads"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, "tune_model.json"]
    with pytest.raises(CheckpointError, match=r"must end in \.pt or \.safetensors"):
        save_native(sd, tmp_path / "model.bin")
