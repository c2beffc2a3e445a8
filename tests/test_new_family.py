"""A family with an architecture and tokenizer kind tune knows is one entry: registered in
tune_models' family registry (what an entry in families.FAMILIES does), it is picked up by
config validation, the recipe, the checkpoint writer and the converter with no other edit.
"""

from __future__ import annotations

import json

import pytest
import torch

from tune_models import HF_KEYS, DecoderConfig, ModelFamily, register_family, unregister_family

from train_helpers import make_demo_files, run_recipe, tiny_config


def tinyfam_tiny() -> DecoderConfig:
    """A made-up family's tiny preset: Qwen2's architecture (q/k/v biases), its own sizes."""
    return DecoderConfig(vocab_size=64, dim=48, n_layers=2, n_heads=4, n_kv_heads=2,
                         hidden_dim=96, qkv_bias=True, tie_embeddings=True, max_seq_len=256,
                         rope_theta=50000.0, norm_eps=1e-6)


@pytest.fixture
def tinyfam():
    family = ModelFamily(
        name="tinyfam", presets={"tinyfam_tiny": tinyfam_tiny}, tokenizer="sentencepiece",
        chat_template="chatml", hf_architecture="Qwen2ForCausalLM", hf_model_type="qwen2",
        checkpoint_keys={"hf": HF_KEYS}, hf_token_ids={"bos_token_id": 1, "eos_token_id": 2})
    register_family(family)
    try:
        yield family
    finally:
        unregister_family("tinyfam")


def test_a_family_registered_in_one_entry_trains_converts_and_validates(tinyfam, tmp_path):
    from tune_ckpt import convert, load_native
    from tune_train.checkpointing import latest_checkpoint
    from tune_train.config import load_config
    from tune_train.config_checks import validate_config

    files = make_demo_files(tmp_path / "demo", records=200)
    # The preset's own vocabulary (not the demo tokenizer's 45 ids): a config.json names no
    # tune family, and the converter tells families of one architecture apart by it.
    cfg = tiny_config(files, model="tinyfam_tiny", tokenizer="auto", model_args={"vocab_size": 64},
                      output_dir=str(tmp_path / "run"), max_steps_per_epoch=2)
    # tune config validate: the preset, its family's tokenizer kind and token ids
    assert validate_config(load_config(cfg)) == []
    # the recipe trains it and the checkpoint records the family
    run_recipe(cfg)
    step = latest_checkpoint(tmp_path / "run")
    args = json.loads((step / "tune_model.json").read_text())
    assert args["family"] == "tinyfam" and args["dim"] == 48
    # the converter writes the family's HF layout and reads it back as the family
    hf = convert(step / "native_pytorch_model.pt", target_format="hf",
                 output_path=tmp_path / "hf", progress=False)
    config_json = json.loads((hf / "config.json").read_text())
    assert config_json["architectures"] == ["Qwen2ForCausalLM"]
    back = convert(hf, target_format="native", output_path=tmp_path / "back" / "model.pt",
                   progress=False)
    assert json.loads((back.parent / "tune_model.json").read_text())["family"] == "tinyfam"
    before, after = load_native(step / "native_pytorch_model.pt"), load_native(back)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # and a config naming the family's checkpoint with another family's preset is refused
    other = tiny_config(files, model="llama2_tiny", model_checkpoint=str(back),
                        output_dir=str(tmp_path / "other"))
    problems = validate_config(load_config(other))
    assert any("is a tinyfam checkpoint" in p and "tinyfam_tiny" in p for p in problems), \
        problems


def test_every_family_names_a_tokenizer_kind_of_tune_datas_vocabulary():
    """One vocabulary of tokenizer kinds: a family's name for its kind is tune-data's."""
    from tune_data import TOKENIZER_KINDS
    from tune_models import FAMILIES

    for family in FAMILIES.values():
        assert family.tokenizer in TOKENIZER_KINDS, (family.name, family.tokenizer)
