"""Fixtures for tune-data tests: the real tokenizers and the real Alpaca records, built once."""

import json

import pytest

from tune_data import (
    HFTokenizer,
    Llama3Tokenizer,
    SentencePieceTokenizer,
    alpaca_dataset,
)

# The real tokenizers of every family, by fixture name: tests that hold for any tokenizer
# take ``any_tokenizer`` and run once per family.
FAMILIES = ["tokenizer", "mistral_tokenizer", "llama3_tokenizer", "qwen2_tokenizer",
            "qwen3_tokenizer"]


@pytest.fixture(scope="session")
def tokenizer(llama2_tokenizer_path):
    """Llama 2's SentencePiece tokenizer."""
    return SentencePieceTokenizer(llama2_tokenizer_path)


@pytest.fixture(scope="session")
def mistral_tokenizer(mistral_tokenizer_path):
    return SentencePieceTokenizer(mistral_tokenizer_path)


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_tokenizer_path):
    return Llama3Tokenizer(llama3_tokenizer_path)


@pytest.fixture(scope="session")
def qwen2_tokenizer(qwen2_tokenizer_path):
    return HFTokenizer(qwen2_tokenizer_path)


@pytest.fixture(scope="session")
def qwen3_tokenizer(qwen3_tokenizer_path):
    """Qwen3's, built from vocab.json + merges.txt and the added tokens of its config."""
    return HFTokenizer(qwen3_tokenizer_path.parent)


@pytest.fixture(scope="session")
def gemma3_tokenizer(gemma3_tokenizer_path):
    """The stand-in for Gemma 3's SentencePiece model (testing/gemma_tokenizer.py)."""
    return SentencePieceTokenizer(gemma3_tokenizer_path)


@pytest.fixture(params=FAMILIES)
def any_tokenizer(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def datasets_cache(tmp_path_factory):
    """A private datasets cache, so tests neither read nor fill the user's."""
    return tmp_path_factory.mktemp("datasets-cache")


@pytest.fixture(scope="session")
def alpaca_records(alpaca_json_path):
    return json.loads(alpaca_json_path.read_text())


@pytest.fixture(scope="session")
def alpaca(tokenizer, alpaca_json_path, datasets_cache):
    """All 5,000 real records at max_seq_len 512, prompt masked."""
    return alpaca_dataset(tokenizer, data_files=alpaca_json_path, cache_dir=datasets_cache)

