"""Quick training runs for tests: the demo's generated data and tokenizer, a tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def make_demo_files(folder: Path, records: int = 600) -> dict[str, Path]:
    """The demo's tokenizer (64 pieces) and task records, generated into folder."""
    from tune_data.demo import train_demo_tokenizer, write_demo_data

    return {
        "tokenizer": train_demo_tokenizer(folder / "tokenizer.model"),
        "data": write_demo_data(folder / "data.jsonl", n=records),
    }


def tiny_config(demo_files: dict[str, Path], **extra: Any) -> dict[str, Any]:
    """Config keys for a tiny CPU run of a few steps; ``extra`` overrides any of them."""
    cfg: dict[str, Any] = {
        "dataset": "demo",
        "dataset_source": str(demo_files["data"]),
        "model": "llama2_tiny",
        "model_checkpoint": None,
        "tokenizer": "llama2_tokenizer",
        "tokenizer_checkpoint": str(demo_files["tokenizer"]),
        "max_seq_len": 32,
        "batch_size": 8,
        "lr": 3e-3,
        "epochs": 1,
        "optimizer": "AdamW",
        "device": "cpu",
        "dtype": "fp32",
        "metric_loggers": ["jsonl"],
        "plot": False,
        "max_steps_per_epoch": 6,
    }
    cfg.update(extra)
    return cfg
