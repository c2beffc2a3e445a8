"""tune-ckpt x tune-models x transformers: converted checkpoints give the same logits.

transformers' LlamaForCausalLM is the numerical reference. Every converted checkpoint is
loaded into tune_models.Llama2 with strict=True, its shape taken from the tune_model.json that
tune-ckpt writes beside it.
"""

import json
import shutil

import pytest
import torch

from tune_ckpt import convert, load_native, read_model_args
from tune_models import Llama2, Llama2Config, llama2_7b

from fixtures_hub import write_meta_checkpoint

transformers = pytest.importorskip("transformers")

GQA = {"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "multiple_of": 32,
       "norm_eps": 1e-05, "rope_theta": 500000.0, "vocab_size": -1}
VOCAB = 128


def _load_native(path) -> Llama2:
    with torch.device("meta"):
        model = Llama2(Llama2Config(**read_model_args(path)))
    model.load_state_dict(load_native(path), strict=True, assign=True)
    return model.eval()


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 23), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_hf_checkpoint_saved_by_transformers_converts_with_equal_logits(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=20000.0,
        max_position_embeddings=64, attn_implementation="sdpa",
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    for name, p in hf.named_parameters():  # HF inits norms to ones: make them count
        if "norm" in name:
            p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()

    out = convert(tmp_path / "hf", progress=False)
    assert out == tmp_path / "hf" / "native_pytorch_model.pt"
    ours = _load_native(out)
    assert ours.config.max_seq_len == 64 and ours.config.rope_theta == 20000.0
    tokens = _tokens(VOCAB)
    torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_meta_checkpoint_and_its_hf_export_give_transformers_equal_logits(tmp_path):
    write_meta_checkpoint(tmp_path / "meta", GQA, vocab_size=VOCAB)
    native = convert(tmp_path / "meta" / "consolidated.00.pth", progress=False)
    ours = _load_native(native)

    export = convert(native, target_format="hf", output_path=tmp_path / "export",
                     max_shard_size="60KB", progress=False)
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= \
        {p.name for p in export.iterdir()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    assert isinstance(hf, transformers.LlamaForCausalLM)
    tokens = _tokens(VOCAB)
    torch.testing.assert_close(ours(tokens), hf.eval()(tokens).logits, atol=1e-5, rtol=1e-5)
    assert hf.generation_config.eos_token_id == 2


@pytest.mark.parametrize("n_shards", [2, 8])
@torch.no_grad()
def test_model_parallel_meta_shards_give_the_unsharded_logits(tmp_path, n_shards):
    # 70B-like grouped-query attention, small enough that 8 shards each get one KV head.
    params = {"dim": 128, "n_layers": 2, "n_heads": 16, "n_kv_heads": 8, "multiple_of": 64,
              "norm_eps": 1e-05, "vocab_size": -1}
    write_meta_checkpoint(tmp_path / "whole", params, vocab_size=VOCAB, seed=3)
    write_meta_checkpoint(tmp_path / "split", params, n_shards=n_shards, vocab_size=VOCAB, seed=3)
    assert len(list((tmp_path / "split").glob("consolidated.*.pth"))) == n_shards

    whole = _load_native(convert(tmp_path / "whole" / "consolidated.00.pth", progress=False))
    split = _load_native(convert(tmp_path / "split" / "consolidated.00.pth", progress=False))
    tokens = _tokens(VOCAB)
    torch.testing.assert_close(split(tokens), whole(tokens), atol=0, rtol=0)


def test_real_llama2_7b_files_describe_llama2_7b(tmp_path, llama2_7b_params_path,
                                                 llama2_7b_hf_config_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    shutil.copy(llama2_7b_params_path, meta / "params.json")
    # Shapes without the 13 GB: zero-stride views save only one element of storage.
    torch.save({"tok_embeddings.weight": torch.zeros(1, 1).expand(32000, 4096),
                "layers.0.feed_forward.w1.weight": torch.zeros(1, 1).expand(11008, 4096)},
               meta / "consolidated.00.pth")
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(llama2_7b_hf_config_path, hf / "config.json")
    expected = llama2_7b()
    for folder in (meta, hf):
        assert Llama2Config(**read_model_args(folder)) == expected, folder
    assert json.loads((meta / "params.json").read_text())["vocab_size"] == -1
