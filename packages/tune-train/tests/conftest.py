"""Small, fast training runs for the recipe tests: the demo's generated data and tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from train_helpers import make_demo_files, tiny_config


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory) -> dict[str, Path]:
    return make_demo_files(tmp_path_factory.mktemp("demo"))


@pytest.fixture
def tiny_run(demo_files, tmp_path):
    """A function returning config keys for a tiny, quick CPU run in tmp_path/run."""

    def make(**extra) -> dict:
        return tiny_config(demo_files, **{"output_dir": str(tmp_path / "run"), **extra})

    return make
