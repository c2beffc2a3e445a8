"""Fixtures shared by every test folder: where the real data files are."""

import os
from pathlib import Path

import pytest

# Fixture modules under testing/ (on pytest's pythonpath), shared by every test folder.
pytest_plugins = ["fixtures_hub"]

REPO = Path(__file__).resolve().parent

# Under pytest-xdist (pyproject's addopts run two workers) the workers share the cores: each
# worker's processes get one thread unless OMP_NUM_THREADS says otherwise (threads spinning
# on a busy core cost more than they give), and each worker's torchrun jobs their own
# rendezvous port (torchrun reads PET_MASTER_PORT; its default, 29500, is one for all).
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.startswith("gw"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("PET_MASTER_PORT", str(29600 + int(_WORKER[2:])))


def shared_data_dir() -> Path:
    """../shared/data beside the checkout, or $TUNE_SHARED_DATA."""
    return Path(os.environ.get("TUNE_SHARED_DATA", REPO.parent / "shared" / "data"))


def _shared_file(relative: str) -> Path:
    path = shared_data_dir() / relative
    if not path.is_file():
        pytest.skip(f"real data file {path} is absent (set TUNE_SHARED_DATA to ../shared/data)")
    return path


@pytest.fixture(scope="session")
def llama2_tokenizer_path() -> Path:
    """The real Llama 2 SentencePiece model."""
    return _shared_file("llama2-tokenizer/tokenizer.model")


@pytest.fixture(scope="session")
def alpaca_json_path() -> Path:
    """5,000 real Stanford Alpaca records."""
    return _shared_file("alpaca/alpaca_5000.json")


@pytest.fixture(scope="session")
def sharegpt_json_path() -> Path:
    """500 real ShareGPT conversations of 2, 4 and 6 turns (FastChat's dummy set)."""
    return _shared_file("sharegpt/dummy_conversation.json")


@pytest.fixture(scope="session")
def llamafactory_dpo_path() -> Path:
    """LLaMA-Factory's 300 preference pairs (ShareGPT turns, system turns, prompts of 1-13
    messages ending with a user turn)."""
    return _shared_file("preference/llamafactory-dpo_en_demo.json")


@pytest.fixture(scope="session")
def tinyshakespeare_path() -> Path:
    return _shared_file("tinyshakespeare/input.txt")


@pytest.fixture(scope="session")
def llama2_7b_params_path() -> Path:
    """Meta's params.json for Llama-2-7b."""
    return _shared_file("llama-2-7b/params.json")


@pytest.fixture(scope="session")
def llama2_7b_hf_config_path() -> Path:
    """Hugging Face config.json for Llama-2-7b-hf."""
    return _shared_file("llama-2-7b-hf/config.json")


@pytest.fixture(scope="session")
def mistral_tokenizer_path() -> Path:
    """Mistral 7B v0.1's SentencePiece model."""
    return _shared_file("mistral-tokenizer/tokenizer.model")


@pytest.fixture(scope="session")
def llama3_tokenizer_path() -> Path:
    """Meta's Llama 3 tiktoken BPE file (special tokens are added in code)."""
    return _shared_file("llama3-tokenizer/tokenizer.model")


@pytest.fixture(scope="session")
def qwen2_tokenizer_path() -> Path:
    """Qwen2's tokenizer.json (tokenizer_config.json beside it)."""
    return _shared_file("qwen2-tokenizer/tokenizer.json")


@pytest.fixture(scope="session")
def qwen3_tokenizer_path() -> Path:
    """Qwen3's vocab.json, with merges.txt, tokenizer_config.json (its 26 added tokens),
    chat_template.jinja and generation_config.json beside it; no tokenizer.json."""
    return _shared_file("qwen3-tokenizer/vocab.json")


@pytest.fixture(scope="session")
def gemma3_tokenizer_path(tmp_path_factory) -> Path:
    """A stand-in for Gemma 3's tokenizer.model (testing/gemma_tokenizer.py): a SentencePiece
    BPE of 3,000 pieces with Gemma's settings and special pieces, trained here on the real
    ShareGPT and Alpaca text (a tenth of a second)."""
    from gemma_tokenizer import train_gemma_tokenizer, training_texts

    texts = training_texts(_shared_file("sharegpt/dummy_conversation.json"),
                           _shared_file("alpaca/alpaca_5000.json"))
    return train_gemma_tokenizer(tmp_path_factory.mktemp("gemma3-tokenizer"), texts)


@pytest.fixture(scope="session")
def qwen3_8b_config_path() -> Path:
    """Qwen3-8B's config.json (re-saved by transformers 4.57: layer_types, dtype)."""
    return _shared_file("configs/qwen3-8b/config.json")


def _vocab_vectors(folder: str) -> list[tuple[str, list[int]]]:
    # llama.cpp's format: strings separated by "__ggml_vocab_test__" lines (the last one
    # empty), and line N of the .out file the ids of string N.
    inputs = _shared_file(f"{folder}/vectors.inp").read_text(encoding="utf-8")
    outputs = _shared_file(f"{folder}/vectors.out").read_text(encoding="utf-8")
    texts = inputs.split("\n__ggml_vocab_test__\n")
    ids = [[int(i) for i in line.split()] for line in outputs.split("\n")]
    assert texts[-1] == "" and len(ids) == len(texts), "unexpected vectors file layout"
    return list(zip(texts[:-1], ids[:-1]))


@pytest.fixture(scope="session")
def llama3_vectors() -> list[tuple[str, list[int]]]:
    """llama.cpp's 46 Llama 3 test strings with their expected ids (no special tokens)."""
    return _vocab_vectors("llama3-tokenizer")


@pytest.fixture(scope="session")
def qwen2_vectors() -> list[tuple[str, list[int]]]:
    """The same 46 strings with their expected Qwen2 ids."""
    return _vocab_vectors("qwen2-tokenizer")


@pytest.fixture(scope="session")
def gsm8k_test_path() -> Path:
    """GSM8K's 1,319 test problems (question, answer ending '#### N')."""
    return _shared_file("gsm8k/test.jsonl")


@pytest.fixture(scope="session")
def gsm8k_train_path() -> Path:
    """GSM8K's 7,473 training problems."""
    return _shared_file("gsm8k/train.jsonl")
