"""Fixtures for the local Hugging Face Hub stand-in (see hub_server.py).

* ``hub_server``: the running server, emptied for each test, with ``HF_ENDPOINT``, ``HF_HOME``
  and the hub client's constants pointing at it and at a temporary home (no real token or
  cache is ever touched). Add repos with ``hub_server.add_repo(...)``; subprocesses inherit
  the environment (``hub_server.env()``).
* ``tiny_meta_repo``: ``meta-llama/Llama-2-7b`` served as a *gated* repo holding a tiny
  Meta-format Llama 2 (consolidated.00.pth + params.json, fp32) and the real Llama 2
  tokenizer.model; its accepted token is ``tiny_meta_repo.token``.
* ``write_meta_checkpoint(folder, params, ...)``: write a random Meta checkpoint (optionally
  split into model-parallel shards the way Meta's fairscale layers split weights).
* ``tiny_llama3_repo``, ``tiny_qwen2_repo``, ``tiny_qwen3_repo``, ``tiny_gemma3_repo``: a tiny
  model of each family as its Hub repository holds it (safetensors, config.json), with the
  family's tokenizer files (Qwen3: the real vocab.json + merges.txt folder; Gemma 3, gated:
  the stand-in SentencePiece model of testing/gemma_tokenizer.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest

from hub_server import HubServer

if TYPE_CHECKING:
    import torch

TEST_TOKEN = "hf_tune_test_token_accepted"
OTHER_TOKEN = "hf_tune_test_token_not_approved"

# The shape tests and the tutorial walk-through use: llama2_tiny() in tune_models terms
# (grouped-query, 2 layers) with the real tokenizer's 32000-token vocabulary.
TINY_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32,
               "norm_eps": 1e-05, "vocab_size": -1}
TINY_VOCAB = 32000

# Meta's model-parallel split (fairscale ColumnParallelLinear splits output rows,
# RowParallelLinear splits input columns, norms are copied; Llama 2's ParallelEmbedding splits
# the columns, Llama 3's VocabParallelEmbedding the rows). Written out here on its own so the
# converter's merge is tested against an independent statement of it.
_SPLIT_ROWS = ("wq", "wk", "wv", "w1", "w3", "output")
_SPLIT_COLS = ("wo", "w2")


def _split_dim(key: str, vocab_parallel: bool) -> int | None:
    name = key.split(".")[-2]
    if name == "tok_embeddings":
        return 0 if vocab_parallel else 1
    return 0 if name in _SPLIT_ROWS else 1 if name in _SPLIT_COLS else None


def meta_state_dict(params: dict, vocab_size: int = TINY_VOCAB, seed: int = 0,
                    dtype: torch.dtype | None = None, tied: bool = False
                    ) -> dict[str, torch.Tensor]:
    """A random, merged Meta-layout state dict for ``params`` (norms random too).

    With ``tied`` the output matrix is a copy of the embedding, as in Llama 3.2's files.
    """
    import torch

    from tune_models import DecoderConfig

    dtype = dtype or torch.float32
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    head = dim // n_heads
    hidden = DecoderConfig(dim=dim, n_heads=n_heads, multiple_of=params.get("multiple_of", 256),
                           ffn_dim_multiplier=params.get("ffn_dim_multiplier")).hidden_dim
    vocab = params["vocab_size"] if params.get("vocab_size", -1) > 0 else vocab_size
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    def norm(n: int) -> torch.Tensor:
        return (0.5 + torch.rand(n, generator=g)).to(dtype)

    sd = {"tok_embeddings.weight": w(vocab, dim)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = w(n_heads * head, dim)
        sd[p + "attention.wk.weight"] = w(n_kv * head, dim)
        sd[p + "attention.wv.weight"] = w(n_kv * head, dim)
        sd[p + "attention.wo.weight"] = w(dim, n_heads * head)
        sd[p + "feed_forward.w1.weight"] = w(hidden, dim)
        sd[p + "feed_forward.w2.weight"] = w(dim, hidden)
        sd[p + "feed_forward.w3.weight"] = w(hidden, dim)
        sd[p + "attention_norm.weight"] = norm(dim)
        sd[p + "ffn_norm.weight"] = norm(dim)
    sd["norm.weight"] = norm(dim)
    sd["output.weight"] = sd["tok_embeddings.weight"].clone() if tied else w(vocab, dim)
    return sd


def write_meta_checkpoint(
    folder: Path,
    params: dict = TINY_PARAMS,
    *,
    n_shards: int = 1,
    vocab_size: int = TINY_VOCAB,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    tied: bool = False,
    vocab_parallel: bool = False,
) -> dict[str, torch.Tensor]:
    """Write consolidated.NN.pth (n_shards of them) + params.json into ``folder``.

    Each shard also carries ``rope.freqs`` as Meta's files do.

    Args:
        folder: Where to write.
        params: params.json's content.
        n_shards: Model-parallel shards to cut the weights into.
        vocab_size: The vocabulary when params.json says -1.
        seed: Of the random weights.
        dtype: Of the random weights (default fp32).
        state_dict: Meta-named weights to write instead of random ones.
        tied: Random weights with the output a copy of the embedding (Llama 3.2).
        vocab_parallel: Split the embedding along the vocabulary, as Llama 3's
            VocabParallelEmbedding does (Llama 2's ParallelEmbedding splits the columns).

    Returns:
        The merged Meta state dict the shards were cut from (the reference).
    """
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else \
        meta_state_dict(params, vocab_size, seed, dtype, tied)
    head = params["dim"] // params["n_heads"]
    freqs = 1.0 / (params.get("rope_theta", 10000.0) ** (torch.arange(0, head, 2) / head))
    for shard in range(n_shards):
        part = {}
        for key, tensor in sd.items():
            dim = _split_dim(key, vocab_parallel)
            part[key] = tensor if dim is None else tensor.chunk(n_shards, dim)[shard].clone()
        part["rope.freqs"] = freqs.to(sd["norm.weight"].dtype)
        torch.save(part, folder / f"consolidated.{shard:02d}.pth")
    (folder / "params.json").write_text(json.dumps(params))
    return sd


@pytest.fixture(scope="session")
def _hub_server_process():
    server = HubServer().start()
    yield server
    server.stop()


@pytest.fixture
def hub_server(_hub_server_process, monkeypatch, tmp_path):
    """The local Hub, empty, with the hub client pointed at it and at a temporary HF_HOME."""
    import huggingface_hub.constants as constants

    server = _hub_server_process
    server.reset()
    home = tmp_path / "hf_home"
    home.mkdir()
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    env = {"HF_ENDPOINT": server.url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_ETAG_TIMEOUT": "10"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # huggingface_hub reads its environment once, at import: repoint the live module too.
    patched = {
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in patched.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    if "HF_HUB_DISABLE_XET" in vars(constants):
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    server.env = lambda: dict(os.environ)
    server.home = home
    yield server
    server.reset()


@pytest.fixture(scope="session")
def _tiny_meta_checkpoint(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("tiny_meta")
    return folder, write_meta_checkpoint(folder, TINY_PARAMS)


@pytest.fixture
def tiny_meta_repo(hub_server, _tiny_meta_checkpoint, llama2_tokenizer_path):
    """Gated ``meta-llama/Llama-2-7b`` with a tiny Meta checkpoint and the real tokenizer."""
    folder, state_dict = _tiny_meta_checkpoint
    files = {
        "consolidated.00.pth": folder / "consolidated.00.pth",
        "params.json": folder / "params.json",
        "tokenizer.model": Path(llama2_tokenizer_path),
        "README.md": "# Llama 2 (tiny test stand-in)\n",
        "LICENSE.txt": "test license\n",
    }
    repo = hub_server.add_repo("meta-llama/Llama-2-7b", files, gated=True, tokens=[TEST_TOKEN])
    hub_server.add_token(OTHER_TOKEN)
    return SimpleNamespace(
        repo_id=repo.repo_id, token=TEST_TOKEN, other_token=OTHER_TOKEN, sha=repo.sha,
        files=sorted(files), params=dict(TINY_PARAMS), vocab_size=TINY_VOCAB,
        state_dict=state_dict, server=hub_server,
    )


# A tiny Llama 3.2 with Meta's own RoPE scaling constants (so its params.json can say it):
# what meta-llama/Llama-3.2-1B holds, at 64 wide.
TINY_LLAMA3 = {"vocab_size": 256, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
               "multiple_of": 32, "ffn_dim_multiplier": 1.5, "rope_theta": 500000.0,
               "max_seq_len": 131072, "tie_embeddings": True,
               "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}}


def _tiny_export(folder: Path, config, family: str, targets: tuple[str, ...]) -> Path:
    """Random bf16 weights of ``config`` written by tune-ckpt in each target layout."""
    import torch

    from tune_ckpt import convert, save_native
    from tune_models import Decoder

    torch.manual_seed(0)
    model = Decoder(config).to(torch.bfloat16)
    native = save_native(model.state_dict(), folder / "native" / "native_pytorch_model.pt",
                         model_args=config, family=family)
    for target in targets:
        convert(native, target_format=target, output_path=folder / target, progress=False)
    return folder


@pytest.fixture(scope="session")
def _tiny_llama3_files(tmp_path_factory) -> Path:
    from tune_models import DecoderConfig

    return _tiny_export(tmp_path_factory.mktemp("tiny_llama3"), DecoderConfig(**TINY_LLAMA3),
                        "llama3", ("hf", "meta"))


@pytest.fixture
def tiny_llama3_repo(hub_server, _tiny_llama3_files, llama3_tokenizer_path):
    """Gated ``meta-llama/Llama-3.2-1B`` laid out as on the Hub: safetensors and config.json
    at the top, Meta's consolidated.00.pth, params.json and tiktoken tokenizer.model under
    original/ (a tiny model, the real Llama 3 tokenizer)."""
    hf, meta = _tiny_llama3_files / "hf", _tiny_llama3_files / "meta"
    files = {
        "config.json": hf / "config.json",
        "generation_config.json": hf / "generation_config.json",
        "model.safetensors": hf / "model.safetensors",
        "tokenizer_config.json": '{"bos_token": "<|begin_of_text|>"}\n',
        "original/consolidated.00.pth": meta / "consolidated.00.pth",
        "original/params.json": meta / "params.json",
        "original/tokenizer.model": Path(llama3_tokenizer_path),
        "README.md": "# Llama 3.2 (tiny test stand-in)\n",
        "LICENSE.txt": "test license\n",
    }
    repo = hub_server.add_repo("meta-llama/Llama-3.2-1B", files, gated=True, tokens=[TEST_TOKEN])
    return SimpleNamespace(repo_id=repo.repo_id, token=TEST_TOKEN, files=sorted(files),
                           server=hub_server, native=_tiny_llama3_files / "native")


@pytest.fixture(scope="session")
def _tiny_qwen2_files(tmp_path_factory) -> Path:
    from tune_models import qwen2_tiny

    return _tiny_export(tmp_path_factory.mktemp("tiny_qwen2"), qwen2_tiny(vocab_size=256),
                        "qwen2", ("hf",))


@pytest.fixture
def tiny_qwen2_repo(hub_server, _tiny_qwen2_files, qwen2_tokenizer_path):
    """``Qwen/Qwen2.5-0.5B`` (public) as on the Hub: safetensors, config.json and the real
    Qwen2 tokenizer.json (a tiny model)."""
    hf = _tiny_qwen2_files / "hf"
    tokenizer = Path(qwen2_tokenizer_path)
    files = {
        "config.json": hf / "config.json",
        "generation_config.json": hf / "generation_config.json",
        "model.safetensors": hf / "model.safetensors",
        "tokenizer.json": tokenizer,
        "tokenizer_config.json": tokenizer.with_name("tokenizer_config.json"),
        "README.md": "# Qwen2.5 (tiny test stand-in)\n",
        "LICENSE": "test license\n",
    }
    repo = hub_server.add_repo("Qwen/Qwen2.5-0.5B", files)
    return SimpleNamespace(repo_id=repo.repo_id, files=sorted(files), server=hub_server,
                           native=_tiny_qwen2_files / "native")


@pytest.fixture(scope="session")
def _tiny_qwen3_files(tmp_path_factory) -> Path:
    from tune_models import qwen3_tiny

    return _tiny_export(tmp_path_factory.mktemp("tiny_qwen3"), qwen3_tiny(vocab_size=256),
                        "qwen3", ("hf",))


# The real Qwen3 tokenizer folder's files (no tokenizer.json there: a transformers re-save).
QWEN3_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json",
                         "added_tokens.json", "special_tokens_map.json", "chat_template.jinja")


@pytest.fixture
def tiny_qwen3_repo(hub_server, _tiny_qwen3_files, qwen3_tokenizer_path):
    """``Qwen/Qwen3-0.6B`` (public): safetensors and config.json of a tiny Qwen3, with the
    real Qwen3 tokenizer files (vocab.json + merges.txt, its added tokens and its chat
    template)."""
    hf = _tiny_qwen3_files / "hf"
    folder = Path(qwen3_tokenizer_path).parent
    files = {
        "config.json": hf / "config.json",
        "generation_config.json": hf / "generation_config.json",
        "model.safetensors": hf / "model.safetensors",
        **{name: folder / name for name in QWEN3_TOKENIZER_FILES},
        "README.md": "# Qwen3 (tiny test stand-in)\n",
        "LICENSE": "test license\n",
    }
    repo = hub_server.add_repo("Qwen/Qwen3-0.6B", files)
    return SimpleNamespace(repo_id=repo.repo_id, files=sorted(files), server=hub_server,
                           native=_tiny_qwen3_files / "native", tokenizer="vocab.json")


@pytest.fixture(scope="session")
def _tiny_gemma3_files(tmp_path_factory) -> Path:
    from tune_models import gemma3_tiny

    return _tiny_export(tmp_path_factory.mktemp("tiny_gemma3"), gemma3_tiny(vocab_size=3000),
                        "gemma3", ("hf",))


@pytest.fixture
def tiny_gemma3_repo(hub_server, _tiny_gemma3_files, gemma3_tokenizer_path):
    """Gated ``google/gemma-3-1b-pt``: safetensors and config.json of a tiny Gemma 3 with the
    stand-in for its SentencePiece tokenizer.model (testing/gemma_tokenizer.py)."""
    hf = _tiny_gemma3_files / "hf"
    files = {
        "config.json": hf / "config.json",
        "generation_config.json": hf / "generation_config.json",
        "model.safetensors": hf / "model.safetensors",
        "tokenizer.model": Path(gemma3_tokenizer_path),
        "README.md": "# Gemma 3 (tiny test stand-in)\n",
    }
    repo = hub_server.add_repo("google/gemma-3-1b-pt", files, gated=True, tokens=[TEST_TOKEN])
    return SimpleNamespace(repo_id=repo.repo_id, token=TEST_TOKEN, files=sorted(files),
                           server=hub_server, native=_tiny_gemma3_files / "native",
                           tokenizer="tokenizer.model")


__all__ = ["TEST_TOKEN", "TINY_LLAMA3", "TINY_PARAMS", "hub_server", "meta_state_dict",
           "tiny_gemma3_repo", "tiny_llama3_repo", "tiny_meta_repo", "tiny_qwen2_repo",
           "tiny_qwen3_repo", "write_meta_checkpoint"]
