"""Fixtures shared by every test folder: where the real data files are."""

import os
from pathlib import Path

import pytest

# Fixture modules under testing/ (on pytest's pythonpath), shared by every test folder.
pytest_plugins = ["fixtures_hub"]

REPO = Path(__file__).resolve().parent


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
