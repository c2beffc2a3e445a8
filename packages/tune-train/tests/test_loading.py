"""What `tune generate` and `tune eval` load: any family's checkpoint from its tune_model.json,
and its tokenizer found where a download or a training run leaves it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tune_ckpt import write_model_args
from tune_data import load_tokenizer
from tune_models import Decoder, llama3_tiny, mistral_tiny, qwen2_tiny
from tune_train.errors import RecipeError
from tune_train.loading import load_model, resolve_tokenizer


def _save(folder, config):
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = Decoder(config)
    model.init_weights()
    path = folder / "native_pytorch_model.pt"
    torch.save(model.state_dict(), path)
    write_model_args(folder, vars(config))
    return path, model.eval()


@pytest.mark.parametrize("make", [llama3_tiny, mistral_tiny, qwen2_tiny])
def test_any_familys_checkpoint_loads_from_its_tune_model_json(make, tmp_path):
    config = make(vocab_size=300)
    path, reference = _save(tmp_path, config)
    model, loaded_config = load_model(tmp_path, device="cpu")
    assert loaded_config == config
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), rtol=0, atol=0)


def test_an_unknown_rope_scaling_type_in_tune_model_json_is_one_line(tmp_path):
    path, _ = _save(tmp_path, llama3_tiny(vocab_size=300))
    config = vars(llama3_tiny(vocab_size=300))
    # Written by hand (write_model_args refuses it), as a newer tune or an edit could leave it.
    (tmp_path / "tune_model.json").write_text(json.dumps(
        {**config, "rope_scaling": {**config["rope_scaling"], "rope_type": "yarn"}}))
    with pytest.raises(RecipeError) as e:
        load_model(path, device="cpu")
    assert str(e.value) == (
        f"{tmp_path / 'tune_model.json'}: rope_scaling type 'yarn' is not supported "
        "(supported: llama3, linear); set rope_type to one of them or rope_scaling to None")


def test_the_tokenizer_is_found_where_each_family_ships_it(
    tmp_path, llama2_tokenizer_path, llama3_tokenizer_path, qwen2_tokenizer_path
):
    # Llama 2 (Meta or HF): tokenizer.model beside the weights.
    llama2 = tmp_path / "llama2"
    llama2.mkdir()
    shutil.copy(llama2_tokenizer_path, llama2 / "tokenizer.model")
    weights = llama2 / "native_pytorch_model.pt"
    assert resolve_tokenizer(weights, None) == llama2 / "tokenizer.model"
    # Llama 3 from the Hub: Meta's tiktoken file under original/, beside HF's tokenizer.json
    # (here Qwen2's stands in for it); Meta's file is the one Llama 3 configs train with.
    llama3 = tmp_path / "llama3"
    (llama3 / "original").mkdir(parents=True)
    shutil.copy(llama3_tokenizer_path, llama3 / "original" / "tokenizer.model")
    shutil.copy(qwen2_tokenizer_path, llama3 / "tokenizer.json")
    found = resolve_tokenizer(llama3 / "native_pytorch_model.pt", None)
    assert found == llama3 / "original" / "tokenizer.model"
    assert load_tokenizer(found).encode("Hello world", add_bos=False) == [9906, 1917]
    # Qwen2: tokenizer.json only.
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    shutil.copy(qwen2_tokenizer_path, qwen / "tokenizer.json")
    assert resolve_tokenizer(qwen / "native_pytorch_model.pt", None) == qwen / "tokenizer.json"
    # A training run's step folder: the tokenizer its config.yaml names.
    step = tmp_path / "run" / "checkpoints" / "step_0000003"
    step.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text(
        f"tokenizer_checkpoint: {llama3 / 'original' / 'tokenizer.model'}\n")
    found = resolve_tokenizer(step / "native_pytorch_model.pt", None)
    assert found == llama3 / "original" / "tokenizer.model"
    with pytest.raises(RecipeError, match="no tokenizer found for .*; pass --tokenizer "
                                          "path/to/tokenizer.model \\(or tokenizer.json\\)"):
        resolve_tokenizer(tmp_path / "nothing" / "native_pytorch_model.pt", None)
