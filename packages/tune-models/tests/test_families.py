"""The family registry: presets by name, JSON-safe configs, key maps that fit real models."""

import json

import pytest
import torch
from hf_reference import family_twins, hf_model

from tune_models import (
    FAMILIES,
    META_KEYS,
    MODELS,
    Decoder,
    DecoderConfig,
    checkpoint_key_map,
    family_of,
    native_shapes,
    qkv_rows,
)

transformers = pytest.importorskip("transformers")


def test_every_preset_is_in_one_family_and_in_models():
    names = [name for family in FAMILIES.values() for name in family.presets]
    assert len(names) == len(set(names)), "a preset name is used by two families"
    assert set(MODELS) == set(names)
    for family in FAMILIES.values():
        for name in family.presets:
            assert family_of(name) is family
    assert family_of("qwen2_5_7b").chat_template == "chatml"
    assert family_of("llama3_2_1b").tokenizer == "tiktoken"
    with pytest.raises(KeyError, match="no model preset 'llama4_8b'; known: .*llama3_1_8b"):
        family_of("llama4_8b")


@pytest.mark.parametrize("name", list(MODELS))
def test_preset_configs_survive_a_json_round_trip(name):
    """tune_model.json holds vars(config): it must rebuild the very same config."""
    config = MODELS[name]()
    assert DecoderConfig(**json.loads(json.dumps(vars(config)))) == config


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_names_are_transformers_names(family):
    entry = FAMILIES[family]
    model_class = getattr(transformers, entry.hf_architecture)
    assert model_class.config_class.model_type == entry.hf_model_type


@pytest.mark.parametrize("name", list(MODELS))
def test_native_shapes_are_the_modules_shapes(name):
    config = MODELS[name]()
    with torch.device("meta"):
        model = Decoder(config)
    assert native_shapes(config) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    q, k, v = qkv_rows(config)
    attention = model.layers[0].attention
    assert (q, k, v) == (config.n_heads * attention.head_dim,) + (
        config.n_kv_heads * attention.head_dim,) * 2


@pytest.mark.parametrize("name", list(MODELS))
def test_key_maps_cover_exactly_the_model_parameters(name):
    config = MODELS[name]()
    with torch.device("meta"):
        keys = list(Decoder(config).state_dict())
    for layout, templates in family_of(name).checkpoint_keys.items():
        assert list(checkpoint_key_map(config, templates)) == keys, layout


@pytest.mark.parametrize("name", list(family_twins()))
def test_hf_key_map_names_every_tensor_of_the_transformers_model(name):
    config, architecture = family_twins()[name]
    hf_keys = set(hf_model(config, architecture).state_dict())
    if config.tie_embeddings:
        hf_keys.discard("lm_head.weight")  # transformers lists the tied matrix twice
    family = next(f for f in FAMILIES.values()
                  if f.hf_architecture.lower().startswith(architecture))
    templates = family.checkpoint_keys["hf"]
    mapped = [k for sources in checkpoint_key_map(config, templates).values() for k in sources]
    assert len(mapped) == len(set(mapped))
    assert set(mapped) == hf_keys


def test_meta_layout_has_no_name_for_a_bias():
    config = FAMILIES["qwen2"].presets["qwen2_tiny"]()
    assert "meta" not in FAMILIES["qwen2"].checkpoint_keys
    with pytest.raises(ValueError, match="no name for 'layers.0.attention.wqkv.bias'"):
        checkpoint_key_map(config, META_KEYS)
    sources = checkpoint_key_map(FAMILIES["llama2"].presets["llama2_tiny"](), META_KEYS)
    assert sources["layers.1.attention.wqkv.weight"] == (
        "layers.1.attention.wq.weight", "layers.1.attention.wk.weight",
        "layers.1.attention.wv.weight",
    )
