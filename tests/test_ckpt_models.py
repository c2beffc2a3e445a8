"""tune-ckpt x tune-models x transformers, for every family: converted checkpoints give the
same logits.

transformers' models are the numerical reference and ``save_pretrained`` / ``from_pretrained``
the reference for the Hugging Face files. Conversions run through the real ``tune
convert_checkpoint`` command; every converted checkpoint is loaded into
``tune_models.Decoder`` with strict=True, its shape taken from the tune_model.json that
tune-ckpt writes beside it. The reference weights come from testing/hf_reference.py's own
statement of the HF -> native map, not from the converter.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_reference import family_twins, hf_and_native
from safetensors import safe_open

from tune_ckpt import (
    convert,
    load_native,
    read_model_args,
    read_model_family,
    save_native,
)
from tune_models import FAMILIES, Decoder, DecoderConfig, llama2_7b

from fixtures_hub import write_meta_checkpoint

transformers = pytest.importorskip("transformers")

TUNE = str(Path(sys.executable).with_name("tune"))
VOCAB = 256
# The family each twin of hf_reference.family_twins() belongs to.
FAMILY = {"llama2": "llama2", "llama3_1": "llama3", "llama3_2": "llama3",
          "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}


def _tune(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([TUNE, *args], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _load(path) -> Decoder:
    with torch.device("meta"):
        model = Decoder(DecoderConfig(**read_model_args(path)))
    model.load_state_dict(load_native(path), strict=True, assign=True)
    return model.eval()


def _tokens() -> torch.Tensor:
    # 70 positions: past mistral_tiny's window (16) and llama3_tiny's original context (48).
    return torch.randint(0, VOCAB, (3, 70), generator=torch.Generator().manual_seed(1))


def _equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _same_model(a: DecoderConfig, b: DecoderConfig) -> None:
    """The same model: HF files give the FFN width itself, not Meta's rule's inputs."""
    skip = ("multiple_of", "ffn_dim_multiplier")
    assert {k: v for k, v in vars(a).items() if k not in skip} == \
        {k: v for k, v in vars(b).items() if k not in skip}


@pytest.mark.parametrize("name", list(family_twins()))
@torch.no_grad()
def test_save_pretrained_converts_with_equal_logits(tmp_path, name):
    config, architecture = family_twins(VOCAB)[name]
    hf, ours = hf_and_native(config, seed=3, architecture=architecture)
    reference = hf(_tokens()).logits
    for sharded in (True, False):
        folder = tmp_path / ("sharded" if sharded else "single")
        hf.save_pretrained(folder, max_shard_size="100KB" if sharded else "5GB")
        assert (folder / "model.safetensors.index.json").is_file() == sharded
        if sharded:
            _tune("convert_checkpoint", "--checkpoint_path", str(folder))
        else:  # the same code without the command's start-up (seconds on a busy machine)
            convert(folder, progress=False)
        native = folder / "native_pytorch_model.pt"
        _equal(load_native(native), ours.state_dict())
        _same_model(DecoderConfig(**read_model_args(native)), config)
        assert read_model_family(native) == FAMILY[name]
        torch.testing.assert_close(_load(native)(_tokens()), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(family_twins()))
@torch.no_grad()
def test_native_export_loads_in_transformers_and_comes_back_bit_identical(tmp_path, name):
    config, _ = family_twins(VOCAB)[name]
    family = FAMILY[name]
    _, ours = hf_and_native(config, seed=4, architecture=family_twins()[name][1])
    native = save_native(ours.state_dict(), tmp_path / "native_pytorch_model.pt",
                         model_args=config, family=family)
    export = tmp_path / "hf"
    _tune("convert_checkpoint", "--checkpoint_path", str(native), "--to", "hf", "-o",
          str(export))

    hf = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    assert type(hf).__name__ == FAMILIES[family].hf_architecture
    torch.testing.assert_close(hf(_tokens()).logits, ours(_tokens()), atol=1e-5, rtol=1e-5)
    with safe_open(export / "model.safetensors", "pt") as f:
        stored = set(f.keys())
    # What save_pretrained writes for the same model: the same names, no lm_head when tied.
    reference = tmp_path / "reference"
    hf.save_pretrained(reference)
    with safe_open(reference / "model.safetensors", "pt") as f:
        assert stored == set(f.keys())
    assert ("lm_head.weight" in stored) == (not config.tie_embeddings)
    assert hf.config.tie_word_embeddings == config.tie_embeddings

    back = convert(export, output_path=tmp_path / "back" / "native_pytorch_model.pt",
                   progress=False)
    _equal(load_native(back), ours.state_dict())
    _same_model(DecoderConfig(**read_model_args(back)), config)
    assert read_model_family(back) == family


def _meta_names(native: dict[str, torch.Tensor], config: DecoderConfig) -> dict:
    """Meta's names for a native state dict (Meta's layout is the native one, q/k/v apart)."""
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    out = {}
    for key, tensor in native.items():
        if key.endswith("wqkv.weight"):
            p = key.removesuffix("wqkv.weight")
            out[p + "wq.weight"], out[p + "wk.weight"], out[p + "wv.weight"] = \
                tensor[:q], tensor[q : q + kv], tensor[q + kv :]
        else:
            out[key] = tensor
    if config.tie_embeddings:  # Meta's code has its own output matrix; 3.2's is a copy
        out["output.weight"] = native["tok_embeddings.weight"].clone()
    return out


LLAMA3_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": VOCAB,
                 "multiple_of": 32, "ffn_dim_multiplier": 1.5, "norm_eps": 1e-05,
                 "rope_theta": 500000.0, "use_scaled_rope": True}


@pytest.mark.parametrize("release", ["3.2 (tied, factor 32)", "3.1 (2 shards, factor 8)"])
@torch.no_grad()
def test_meta_llama3_original_folder_converts_with_equal_logits(tmp_path, release):
    tied = release.startswith("3.2")
    params = dict(LLAMA3_PARAMS) if tied else {**LLAMA3_PARAMS, "rope_scaling_factor": 8.0}
    factor = 32.0 if tied else 8.0
    config = DecoderConfig(
        vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
        ffn_dim_multiplier=1.5, rope_theta=500000.0, max_seq_len=131072, tie_embeddings=tied,
        rope_scaling={"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    assert config.hidden_dim == 256  # Meta's rule: int(1.5 * int(8 * 64 / 3)) rounded up to 32
    hf, ours = hf_and_native(config, seed=5)
    original = tmp_path / "Llama-3" / "original"
    write_meta_checkpoint(original, params, state_dict=_meta_names(ours.state_dict(), config),
                          n_shards=1 if tied else 2, vocab_parallel=True)
    _tune("convert_checkpoint", "--checkpoint_path", str(original / "consolidated.00.pth"))
    native = original / "native_pytorch_model.pt"
    _equal(load_native(native), ours.state_dict())
    assert DecoderConfig(**read_model_args(native)) == config
    assert read_model_family(native) == "llama3"
    torch.testing.assert_close(_load(native)(_tokens()), hf(_tokens()).logits, atol=1e-5,
                               rtol=1e-5)


def test_real_llama2_7b_files_describe_llama2_7b(tmp_path, llama2_7b_params_path,
                                                 llama2_7b_hf_config_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_bytes(Path(llama2_7b_params_path).read_bytes())
    # Shapes without the 13 GB: zero-stride views save only one element of storage.
    torch.save({"tok_embeddings.weight": torch.zeros(1, 1).expand(32000, 4096),
                "output.weight": torch.ones(1, 1).expand(32000, 4096)},
               meta / "consolidated.00.pth")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_bytes(Path(llama2_7b_hf_config_path).read_bytes())
    expected = llama2_7b()
    for folder in (meta, hf):
        assert DecoderConfig(**read_model_args(folder)) == expected, folder
        assert read_model_family(folder) == "llama2"
    assert json.loads((meta / "params.json").read_text())["vocab_size"] == -1


@torch.no_grad()
def test_a_tied_hf_checkpoint_listing_lm_head_too_converts(tmp_path):
    """Some tied checkpoints (older saves, .bin) list the shared matrix under both names."""
    config, _ = family_twins(VOCAB)["qwen2"]
    hf, ours = hf_and_native(config, seed=6, architecture="qwen2")
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _equal(load_native(convert(tmp_path, progress=False)), ours.state_dict())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_an_export_ends_sequences_where_the_familys_tokenizer_does(tmp_path, family, request):
    from tune_data.tokenizers import load_tokenizer

    try:
        path = request.getfixturevalue(f"{family}_tokenizer_path")
    except pytest.FixtureLookupError:
        pytest.skip(f"no fixture gives {family}'s real tokenizer yet")
    tokenizer = load_tokenizer(path)
    preset = next(iter(FAMILIES[family].presets.values()))()
    config = DecoderConfig(**{**vars(preset), "vocab_size": 64, "dim": 32, "n_layers": 1,
                              "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 64, "head_dim": 8})
    with torch.device("meta"):
        model = Decoder(config)
    state = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    native = save_native(state, tmp_path / "native_pytorch_model.pt", model_args=config,
                         family=family)
    export = convert(native, target_format="hf", progress=False)
    generation = json.loads((export / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_id
    if tokenizer.bos_id is not None:
        assert generation["bos_token_id"] == tokenizer.bos_id


@pytest.mark.parametrize("repo_fixture", ["tiny_llama3_repo", "tiny_qwen2_repo",
                                          "tiny_qwen3_repo", "tiny_gemma3_repo"])
def test_tune_download_then_convert_gives_what_tune_needs(tmp_path, repo_fixture, request):
    """`tune download` a Llama 3, Qwen2, Qwen3 or (gated) Gemma 3 repo (the local hub
    stand-in), then convert it: the native model of the right family, and a tokenizer tune
    reads whose ids are the family's, without Meta's duplicate weights."""
    from tune_data.tokenizers import load_tokenizer
    from tune_train.registry import token_ids_problem

    repo = request.getfixturevalue(repo_fixture)
    out = tmp_path / "model"
    token = ["--hf-token", repo.token] if hasattr(repo, "token") else []
    env = {**repo.server.env(), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([TUNE, "download", repo.repo_id, "--output-dir", str(out), *token],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(out.rglob("*.pth")), "Meta's copy of the weights was downloaded"
    _tune("convert_checkpoint", "--checkpoint_path", str(out))
    native = out / "native_pytorch_model.pt"
    _equal(load_native(native), load_native(repo.native))
    family = repo_fixture.split("_")[1]
    assert read_model_family(native) == family
    tokenizer = out / getattr(repo, "tokenizer", (
        "original/tokenizer.model" if family == "llama3" else "tokenizer.json"))
    loaded = load_tokenizer(out if family in ("qwen3", "gemma3") else tokenizer)
    assert loaded.path == tokenizer  # the download folder means its tokenizer file
    assert FAMILIES[family].hf_token_ids["eos_token_id"] in loaded.stop_tokens
    assert token_ids_problem(loaded, FAMILIES[family]) is None


def _published(name: str, request) -> dict:
    from hf_configs import PUBLISHED

    if name == "qwen3_8b":
        return json.loads(Path(request.getfixturevalue("qwen3_8b_config_path")).read_text())
    return PUBLISHED[name]


@pytest.mark.parametrize("name", ["qwen3_0_6b", "qwen3_1_7b", "qwen3_4b", "qwen3_8b",
                                  "qwen3_14b", "qwen3_32b", "gemma3_1b", "gemma3_4b",
                                  "gemma3_12b", "gemma3_27b"])
def test_published_config_json_is_the_preset_and_transformers_counts_its_parameters(
        tmp_path, name, request):
    """Each preset is the model of its Hub config.json: read as tune reads it (4.x spelling,
    and 5.x as transformers re-saves it), and as transformers builds it (the same number of
    parameters, on the meta device). What tune writes for the preset, transformers reads as
    the same model."""
    from hf_configs import transformers_text_model

    from tune_ckpt.hf_config import config_from_hf, hf_config_for
    from tune_models import MODELS

    published, preset = _published(name, request), MODELS[name]()
    family = name.split("_")[0]
    assert config_from_hf(published) == (preset, family)
    transformers.AutoConfig.for_model(**published).save_pretrained(tmp_path)
    resaved = json.loads((tmp_path / "config.json").read_text())
    assert config_from_hf(resaved) == (preset, family)
    with torch.device("meta"):
        ours = sum(p.numel() for p in Decoder(preset).parameters())
        theirs = transformers_text_model(published)
        written = transformers_text_model(hf_config_for(preset, family, "bfloat16"))
    assert ours == sum(p.numel() for p in theirs.parameters())
    for attribute in ("layer_types", "rope_parameters", "sliding_window", "head_dim",
                      "query_pre_attn_scalar", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(written.config, attribute, None) == \
            getattr(theirs.config, attribute, None), attribute


def _tiny_gemma3_multimodal(text_config) -> "transformers.Gemma3ForConditionalGeneration":
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text_config, vision_config=vision,
                                       mm_tokens_per_image=4)
    return transformers.Gemma3ForConditionalGeneration(config).eval()


@torch.no_grad()
def test_a_multimodal_gemma3_checkpoint_converts_its_text_decoder(tmp_path):
    """Gemma 3 4B and up are Gemma3ForConditionalGeneration: the text decoder converts (from
    text_config and the language model's tensors, in the Hub's names and in transformers 5's
    in-memory ones), gives the multimodal model's text-only logits, and says so in one line."""
    from hf_reference import hf_config

    config, _ = family_twins(VOCAB)["gemma3"]
    torch.manual_seed(8)
    model = _tiny_gemma3_multimodal(hf_config(config, "gemma3"))
    for name, p in model.named_parameters():
        if "norm" in name:
            p.uniform_(-0.5, 0.5)
    reference = model(input_ids=_tokens()).logits
    folder = tmp_path / "hub"
    model.save_pretrained(folder, max_shard_size="100KB")
    result = _tune("convert_checkpoint", "--checkpoint_path", str(folder))
    n_vision = sum(1 for k in model.state_dict() if "language_model" not in k
                   and k != "lm_head.weight")
    assert result.stderr.count("\n") >= 1 and (
        f"tune-ckpt: {folder / 'config.json'} describes Gemma3ForConditionalGeneration: "
        f"converting its text decoder (Gemma3ForCausalLM) and leaving out the vision tower and "
        f"projector ({n_vision} tensors)") in result.stderr.splitlines()
    native = folder / "native_pytorch_model.pt"
    assert read_model_family(native) == "gemma3"
    _same_model(DecoderConfig(**read_model_args(native)), config)
    torch.testing.assert_close(_load(native)(_tokens()), reference, atol=1e-5, rtol=1e-5)

    # The same tensors named as transformers 5 holds them in memory (model.language_model.).
    from safetensors.torch import load_file, save_file

    renamed = tmp_path / "v5"
    renamed.mkdir()
    (renamed / "config.json").write_bytes((folder / "config.json").read_bytes())
    tensors = {}
    for shard in folder.glob("model-*.safetensors"):
        tensors.update(load_file(shard))
    save_file({k.replace("language_model.model.", "model.language_model.")
               .replace("vision_tower.", "model.vision_tower."): v for k, v in tensors.items()},
              renamed / "model.safetensors", metadata={"format": "pt"})
    again = convert(renamed, progress=False)
    _equal(load_native(again), load_native(native))


def _hf_folder(tmp_path: Path, name: str, seed: int = 0) -> Path:
    config, architecture = family_twins(VOCAB)[name]
    hf, _ = hf_and_native(config, seed=seed, architecture=architecture)
    hf.save_pretrained(tmp_path / name)
    return tmp_path / name


def _config_of(folder: Path, other: Path) -> None:
    """Put other's config.json beside folder's weights, sizes kept as folder's model has them."""
    mine = json.loads((folder / "config.json").read_text())
    theirs = json.loads((other / "config.json").read_text())
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")
    theirs.pop("layer_types", None)  # one per layer: of the other model's depth
    (folder / "config.json").write_text(json.dumps({**theirs, **{k: mine[k] for k in sizes}}))


@pytest.mark.parametrize("weights, config, message", [
    ("gemma3", "qwen3", "unexpected key 'model.layers.0.post_feedforward_layernorm.weight' "
                        "with shape (64,) and 11 more: not part of a Hugging Face qwen3 "
                        "checkpoint with 6 layers"),
    ("qwen3", "gemma3", "missing key 'model.layers.0.pre_feedforward_layernorm.weight' and 3 "
                        "more of a Hugging Face gemma3 checkpoint with 2 layers (expected shape "
                        "(64,))"),
    ("qwen2", "qwen3", "missing key 'model.layers.0.self_attn.q_norm.weight' and 3 more of a "
                       "Hugging Face qwen3 checkpoint with 2 layers (expected shape (16,))"),
])
def test_a_checkpoint_with_another_familys_config_json_is_one_line(tmp_path, weights, config,
                                                                   message):
    """A Gemma checkpoint with a Qwen3 config.json and the reverse, a Qwen2.5 checkpoint with
    Qwen3's (no q_norm): one line naming the first key that does not fit and the config.json
    to check, nothing written."""
    folder, other = _hf_folder(tmp_path, weights), _hf_folder(tmp_path / "other", config)
    _config_of(folder, other)
    before = sorted(p.name for p in folder.iterdir())
    result = subprocess.run([TUNE, "convert_checkpoint", "--checkpoint_path", str(folder)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert f"(the model as {folder / 'config.json'} describes it: check that it came with " \
        "these weights)" in lines[0]
    assert sorted(p.name for p in folder.iterdir()) == before
