"""tune-ckpt: Hugging Face Hub download and streaming checkpoint conversion (Meta, HF, native),
LoRA adapters in PEFT's format, and merging them into their base.

Needs torch, safetensors, huggingface_hub and tune-models (torch only: a model's shape and
the key schemas of the model and its adapters are defined there once). Names load lazily, so
``import tune_ckpt`` (and the ``tune-ckpt --help`` it backs) costs nothing until a function is
used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from tune_ckpt.errors import CheckpointError

_EXPORTS = {
    "download": "tune_ckpt.hub",
    "convert": "tune_ckpt.conversion",
    "detect_format": "tune_ckpt.conversion",
    "open_checkpoint": "tune_ckpt.conversion",
    "load_native": "tune_ckpt.reading",
    "find_native_file": "tune_ckpt.reading",
    "save_native": "tune_ckpt.native",
    "read_model_args": "tune_ckpt.model_args",
    "read_model_family": "tune_ckpt.model_args",
    "write_model_args": "tune_ckpt.model_args",
    "meta_to_native": "tune_ckpt.keymaps",
    "native_to_meta": "tune_ckpt.keymaps",
    "hf_to_native": "tune_ckpt.keymaps",
    "native_to_hf": "tune_ckpt.keymaps",
    "hf_to_native_rows": "tune_ckpt.keymaps",
    "native_to_hf_rows": "tune_ckpt.keymaps",
    "native_shapes": "tune_ckpt.keymaps",
    "check_model_fits": "tune_ckpt.keymaps",
    "check_finite": "tune_ckpt.reading",
    "model_args_file": "tune_ckpt.model_args",
    "merge_meta_shards": "tune_ckpt.shards",
    "meta_shard_dim": "tune_ckpt.shards",
    "Adapter": "tune_ckpt.adapters",
    "save_peft_adapter": "tune_ckpt.adapters",
    "load_peft_adapter": "tune_ckpt.adapters",
    "native_to_peft": "tune_ckpt.adapters",
    "peft_to_native": "tune_ckpt.adapters",
    "merge_adapter": "tune_ckpt.merge",
}

__all__ = [
    "Adapter",
    "CheckpointError",
    "check_finite",
    "check_model_fits",
    "convert",
    "detect_format",
    "download",
    "find_native_file",
    "hf_to_native",
    "hf_to_native_rows",
    "load_native",
    "load_peft_adapter",
    "merge_adapter",
    "merge_meta_shards",
    "meta_shard_dim",
    "meta_to_native",
    "model_args_file",
    "native_shapes",
    "native_to_hf",
    "native_to_hf_rows",
    "native_to_meta",
    "native_to_peft",
    "open_checkpoint",
    "peft_to_native",
    "read_model_args",
    "read_model_family",
    "save_native",
    "save_peft_adapter",
    "write_model_args",
]
assert set(__all__) == {"CheckpointError", *_EXPORTS}

if TYPE_CHECKING:
    from tune_ckpt.adapters import (
        Adapter,
        load_peft_adapter,
        native_to_peft,
        peft_to_native,
        save_peft_adapter,
    )
    from tune_ckpt.conversion import convert, detect_format, open_checkpoint
    from tune_ckpt.hub import download
    from tune_ckpt.keymaps import (
        check_model_fits,
        hf_to_native,
        hf_to_native_rows,
        meta_to_native,
        native_shapes,
        native_to_hf,
        native_to_hf_rows,
        native_to_meta,
    )
    from tune_ckpt.merge import merge_adapter
    from tune_ckpt.model_args import (
        model_args_file,
        read_model_args,
        read_model_family,
        write_model_args,
    )
    from tune_ckpt.native import save_native
    from tune_ckpt.reading import check_finite, find_native_file, load_native
    from tune_ckpt.shards import merge_meta_shards, meta_shard_dim


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tune_ckpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
