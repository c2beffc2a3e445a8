"""A config's model family decides its tokenizer and checkpoint: `tokenizer: auto` picks the
family's own, and a tokenizer or checkpoint of another family, a vocabulary the model cannot
hold or an unknown rope_scaling type is one line before anything heavy is built."""

from __future__ import annotations

import pytest
import torch

from tune_ckpt import write_model_args
from tune_data import HFTokenizer, Llama3Tokenizer, SentencePieceTokenizer
from tune_models import Decoder, llama3_2_1b, qwen2_tiny
from tune_train import registry
from tune_train.config import ConfigError, TrainConfig, load_config
from tune_train.config_checks import validate_config
from tune_train.errors import RecipeError

from train_helpers import recipe_model


def _setup(cfg: dict):
    """What the recipe builds before its loop: the model (and its DecoderConfig)."""
    return recipe_model(cfg)


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_auto_is_the_default_and_reads_each_familys_file(
    llama2_tokenizer_path, llama3_tokenizer_path, mistral_tokenizer_path, qwen2_tokenizer_path
):
    assert TrainConfig().tokenizer == "auto"
    cases = [("llama2_7b", llama2_tokenizer_path, SentencePieceTokenizer, [15043, 3186]),
             ("mistral_7b", mistral_tokenizer_path, SentencePieceTokenizer, [22557, 1526]),
             ("llama3_1_8b", llama3_tokenizer_path, Llama3Tokenizer, [9906, 1917]),
             ("qwen2_5_7b", qwen2_tokenizer_path, HFTokenizer, [9707, 1879])]
    for model, path, cls, hello in cases:
        cfg = load_config({"model": model, "tokenizer_checkpoint": str(path)})
        tokenizer = registry.build_tokenizer(cfg)
        assert type(tokenizer) is cls
        assert tokenizer.encode("Hello world", add_bos=False) == hello


def test_the_tutorials_tokenizer_kind_still_works(llama2_tokenizer_path):
    cfg = load_config("alpaca_llama2_full_finetune",
                      [f"tokenizer_checkpoint={llama2_tokenizer_path}"])
    assert cfg.tokenizer == "llama2_tokenizer"
    assert type(registry.build_tokenizer(cfg)) is SentencePieceTokenizer


def test_a_tokenizer_kind_of_another_family_is_one_line(llama3_tokenizer_path):
    cfg = load_config({"model": "llama3_2_1b", "tokenizer": "llama2_tokenizer",
                       "tokenizer_checkpoint": str(llama3_tokenizer_path)})
    with pytest.raises(ConfigError) as e:
        registry.build_tokenizer(cfg)
    assert _one_line(e) == (
        "tokenizer 'llama2_tokenizer' reads a SentencePiece tokenizer.model, but model "
        "'llama3_2_1b' is a llama3 model, which reads a Llama 3 tiktoken tokenizer.model "
        "(original/tokenizer.model on the Hub) or a tokenizer.json; set tokenizer: auto (or "
        "llama3_tokenizer)")


def test_a_tokenizer_kind_that_does_not_read_the_file_names_the_config_keys(
        llama3_tokenizer_path, qwen2_tokenizer_path):
    """Both fit a Llama 3 model, but not each other (tune-data's own message names only the
    file and its kind)."""
    for kind, path, reads, found in [
        ("hf_tokenizer", llama3_tokenizer_path, "a Hugging Face tokenizer.json",
         "a Llama 3 tiktoken tokenizer.model (original/tokenizer.model on the Hub)"),
        ("llama3_tokenizer", qwen2_tokenizer_path, "a Llama 3 tiktoken tokenizer.model "
         "(original/tokenizer.model on the Hub)", "a Hugging Face tokenizer.json"),
    ]:
        cfg = load_config({"model": "llama3_2_1b", "tokenizer": kind,
                           "tokenizer_checkpoint": str(path)})
        expected = (f"tokenizer '{kind}' reads {reads}, but tokenizer_checkpoint {path} is "
                    f"{found}; set tokenizer: auto (it reads each file as what it is)")
        assert validate_config(cfg) == [expected]
        with pytest.raises(ConfigError) as e:
            registry.build_tokenizer(cfg)
        assert _one_line(e) == expected


def test_a_tokenizer_file_of_another_family_is_one_line(llama3_tokenizer_path, tiny_run):
    """Llama 3's tokenizer with a Llama 2 model: found from the file's first bytes, before
    the tokenizer is loaded, by `tune config validate` and by the recipe."""
    cfg = tiny_run(tokenizer="auto", tokenizer_checkpoint=str(llama3_tokenizer_path))
    expected = (f"tokenizer_checkpoint {llama3_tokenizer_path} is a Llama 3 tiktoken "
                "tokenizer.model (original/tokenizer.model on the Hub), but model 'llama2_tiny' "
                "is a llama2 model, which reads a SentencePiece tokenizer.model or a "
                "tokenizer.json; point tokenizer_checkpoint at the tokenizer that came with "
                "the model")
    assert validate_config(load_config(cfg)) == [expected]
    with pytest.raises(ConfigError) as e:
        _setup(cfg)
    assert _one_line(e) == expected


def test_a_vocabulary_larger_than_the_model_names_both_sizes(llama3_tokenizer_path, tiny_run):
    """The family's own tokenizer, its ids right, and a model shrunk with model_args: only
    the sizes tell Llama 3's 128,256 tokens from the model's 32,000 rows."""
    cfg = tiny_run(model="llama3_tiny", tokenizer="auto",
                   tokenizer_checkpoint=str(llama3_tokenizer_path),
                   model_args={"vocab_size": 32000})
    with pytest.raises(RecipeError) as e:
        _setup(cfg)
    assert _one_line(e) == (
        f"tokenizer_checkpoint {llama3_tokenizer_path} has 128,256 tokens but model "
        "'llama3_tiny' only 32,000 (its vocab_size): ids past that have no embedding; point "
        "tokenizer_checkpoint at the model's own tokenizer (a llama3 model reads a Llama 3 "
        "tiktoken tokenizer.model (original/tokenizer.model on the Hub) or a tokenizer.json)")


@pytest.mark.parametrize("model, expected_ids", [
    ("llama2_tiny", "llama2 models use BOS 1 and EOS 2"),
    ("llama3_tiny", "llama3 models use BOS 128000 and EOS 128001"),
])
def test_another_familys_tokenizer_json_is_told_by_its_ids(model, expected_ids,
                                                            qwen2_tokenizer_path, tiny_run):
    """A tokenizer.json suits every family's format check, so Qwen2's with a Llama model
    would train (the model taking 151,936 rows) on Qwen's end token; its ids tell."""
    cfg = tiny_run(model=model, tokenizer="auto", tokenizer_checkpoint=str(qwen2_tokenizer_path))
    with pytest.raises(ConfigError) as e:
        _setup(cfg)
    assert _one_line(e) == (
        f"tokenizer_checkpoint {qwen2_tokenizer_path} has BOS none and EOS <|endoftext|> "
        f"151643, but {expected_ids}: it is another model's tokenizer, or a damaged one; "
        "point tokenizer_checkpoint at the tokenizer that came with the model")


def test_a_sentencepiece_model_with_moved_ids_is_one_line(tmp_path, tiny_run):
    """A SentencePiece model of the right format whose BOS/EOS are not Llama 2's 1 and 2
    (trained here with other ids); the demo's own tokenizer (unk 0, bos 1, eos 2) passes."""
    import sentencepiece as spm

    from tune_data.demo import demo_records, render

    moved = tmp_path / "moved.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(render(r) + r["output"] for r in demo_records(300)),
        model_prefix=str(moved.with_suffix("")), model_type="char", vocab_size=40,
        hard_vocab_limit=False, unk_id=0, pad_id=1, bos_id=2, eos_id=3, minloglevel=2,
        num_threads=1)
    with pytest.raises(ConfigError) as e:
        _setup(tiny_run(tokenizer_checkpoint=str(moved)))
    assert _one_line(e).startswith(
        f"tokenizer_checkpoint {moved} has BOS <s> 2 and EOS </s> 3, but llama2 models use "
        "BOS 1 and EOS 2")
    assert type(registry.build_tokenizer(load_config(tiny_run()))) is SentencePieceTokenizer


@pytest.mark.parametrize("override, message", [
    ("model_args.rope_scaling.rope_type=yarn",
     "model_args: rope_scaling type 'yarn' is not supported (supported: llama3, linear); set "
     "rope_type to one of them or rope_scaling to None"),
    ("model_args={rope_scaling: {rope_type: dynamic, factor: 2.0}}",
     "model_args: rope_scaling type 'dynamic' is not supported"),
])
def test_an_unknown_rope_scaling_type_is_one_config_error(override, message, tiny_run):
    for model in ("llama3_2_1b", "llama2_tiny"):  # with and without the preset's own scaling
        cfg = load_config(tiny_run(model=model), [override])
        (problem,) = validate_config(cfg)
        assert problem.startswith(message)
        with pytest.raises(ConfigError) as e:
            _setup(tiny_run(model=model, model_args=cfg.model_args))
        assert _one_line(e).startswith(message)


def test_rope_scaling_overrides_merge_into_the_presets():
    cfg = load_config({"model": "llama3_2_1b"}, ["model_args.rope_scaling.factor=16"])
    scaling = registry.model_config(cfg).rope_scaling
    assert scaling == {**llama3_2_1b().rope_scaling, "factor": 16}
    cfg = load_config({"model": "llama3_2_1b"}, ["model_args.rope_scaling=null"])
    assert registry.model_config(cfg).rope_scaling is None


def _converted(folder, config, family: str | None = None, weights: bool = False):
    """A native checkpoint as `tune convert_checkpoint` leaves it: weights + tune_model.json
    (with the "family" key tune-ckpt may record)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "native_pytorch_model.pt"
    if weights:
        torch.save(Decoder(config).state_dict(), path)
    else:
        path.write_bytes(b"")  # never read: the checks come first
    write_model_args(folder, vars(config))
    if family is not None:
        import json

        sidecar = folder / "tune_model.json"
        sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "family": family}))
    return path


def test_a_checkpoint_recording_another_family_is_one_line(tiny_run, tmp_path,
                                                           llama3_tokenizer_path):
    path = _converted(tmp_path / "qwen", qwen2_tiny(vocab_size=128256), family="qwen2")
    cfg = tiny_run(model="llama3_tiny", tokenizer="auto",
                   tokenizer_checkpoint=str(llama3_tokenizer_path), model_checkpoint=str(path))
    expected = (f"model_checkpoint {path} is a qwen2 checkpoint (its tune_model.json says so), "
                "but model 'llama3_tiny' is a llama3 model; set model to a qwen2 preset "
                "(qwen2_5_0_5b, qwen2_5_1_5b, qwen2_5_7b, qwen2_tiny) or point model_checkpoint "
                "at a llama3 checkpoint")
    assert validate_config(load_config(cfg)) == [expected]
    with pytest.raises(ConfigError) as e:
        _setup(cfg)
    assert _one_line(e) == expected


def test_a_checkpoint_of_another_shape_names_the_preset_it_fits(tiny_run, tmp_path,
                                                                 llama3_tokenizer_path):
    """No family recorded: tune_model.json's shape tells a Qwen2 checkpoint (q/k/v biases,
    its vocabulary) from the Llama 3 model the config names."""
    path = _converted(tmp_path / "qwen", qwen2_tiny())
    cfg = tiny_run(model="llama3_tiny", tokenizer="auto",
                   tokenizer_checkpoint=str(llama3_tokenizer_path), model_checkpoint=str(path))
    with pytest.raises(ConfigError) as e:
        _setup(cfg)
    assert _one_line(e) == (
        f"model_checkpoint {path} holds another model than 'llama3_tiny' (llama3): its "
        "tune_model.json has vocab_size 151936, qkv_bias True where 'llama3_tiny' has 128256, "
        "False; that is the shape of qwen2_tiny (qwen2): set model: qwen2_tiny")
    # Shrinking a preset with model_args, then pointing at the full model's checkpoint.
    full = _converted(tmp_path / "full", llama3_2_1b())
    cfg = load_config({"model": "llama3_2_1b", "model_checkpoint": str(full),
                       "tokenizer_checkpoint": str(llama3_tokenizer_path),
                       "model_args": {"n_layers": 2}})
    (problem,) = validate_config(cfg)
    assert problem.endswith("its tune_model.json has n_layers 16 where 'llama3_2_1b' has 2; "
                            "that is llama3_2_1b's own shape: remove those model_args")


def test_a_checkpoint_without_tune_model_json_is_checked_by_its_tensors(tiny_run, tmp_path,
                                                                        llama3_tokenizer_path):
    path = tmp_path / "bare.pt"
    torch.save(Decoder(qwen2_tiny(vocab_size=128256)).state_dict(), path)
    cfg = tiny_run(model="llama3_tiny", tokenizer="auto",
                   tokenizer_checkpoint=str(llama3_tokenizer_path), model_checkpoint=str(path))
    assert validate_config(load_config(cfg)) == []  # nothing to read without the sidecar
    with pytest.raises(RecipeError) as e:
        _setup(cfg)
    assert _one_line(e) == (
        f"{path} has key(s) model 'llama3_tiny' does not, e.g. 'layers.0.attention.wqkv.bias'; "
        "is it a checkpoint of 'llama3_tiny' (llama3) in native format?")


def test_a_checkpoint_of_the_configs_family_and_shape_loads(tiny_run, tmp_path,
                                                           qwen2_tokenizer_path):
    path = _converted(tmp_path / "qwen", qwen2_tiny(), weights=True)
    cfg = tiny_run(model="qwen2_tiny", tokenizer="auto",
                   tokenizer_checkpoint=str(qwen2_tokenizer_path), model_checkpoint=str(path))
    assert validate_config(load_config(cfg)) == []
    model, _ = _setup(cfg)
    saved = torch.load(path, weights_only=True)
    loaded = model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
