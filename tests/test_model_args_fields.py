"""tune_model.json holds vars(config) of any family's model and rebuilds the same config."""

import pytest

from tune_ckpt import CheckpointError, read_model_args, write_model_args
from tune_models import MODELS, DecoderConfig


@pytest.mark.parametrize("name", list(MODELS))
def test_every_preset_round_trips_through_tune_model_json(tmp_path, name):
    config = MODELS[name]()
    write_model_args(tmp_path, vars(config))
    assert DecoderConfig(**read_model_args(tmp_path)) == config


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("tie_embeddings", "yes", "'tie_embeddings' must be true or false"),
        ("head_dim", 0, "'head_dim' must be a positive integer"),
        ("rope_scaling", 8.0, "'rope_scaling' must be an object"),
        ("qk_norm", 1, "'qk_norm' must be true or false"),
        ("sliding_window_pattern", "6", "'sliding_window_pattern' must be a positive integer"),
        ("query_pre_attn_scalar", -1.0, "'query_pre_attn_scalar' must be a positive number"),
        ("activation", "relu", "activation must be one of silu, gelu_tanh, got 'relu'"),
    ],
)
def test_bad_new_fields_are_refused(tmp_path, field, value, message):
    args = {"vocab_size": 10, "dim": 64, "n_layers": 1, "n_heads": 4, field: value}
    with pytest.raises(CheckpointError, match=message):
        write_model_args(tmp_path, args)
