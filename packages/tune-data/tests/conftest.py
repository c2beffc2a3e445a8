"""Fixtures for tune-data tests: the real tokenizer and the real Alpaca records, built once."""

import json

import pytest

from tune_data import Llama2Tokenizer, alpaca_dataset


@pytest.fixture(scope="session")
def tokenizer(llama2_tokenizer_path):
    return Llama2Tokenizer(llama2_tokenizer_path)


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

