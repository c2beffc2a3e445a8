"""A checkpoint's model: the ``tune_model.json`` sidecar, and reading it off any layout.

A native checkpoint's tensors do not say how many attention heads it has, so every native
checkpoint tune writes gets ``tune_model.json`` in its folder: ``vars(config)`` of its
:class:`tune_models.DecoderConfig`, plus the name of its family, e.g.::

    {"vocab_size": 151936, "dim": 896, "n_layers": 24, "n_heads": 14, "n_kv_heads": 2, ...,
     "qkv_bias": true, "tie_embeddings": true, "family": "qwen2"}

``read_model_args`` returns the config fields only, so ``DecoderConfig(**read_model_args(p))``
builds the model; ``read_model_family`` returns the family.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tune_ckpt.errors import CheckpointError
from tune_ckpt.hf_config import config_from_hf, family_for
from tune_ckpt.meta_params import config_from_meta
from tune_ckpt.names import HF_CONFIG_FILE, META_PARAMS_FILE, MODEL_ARGS_FILE
from tune_ckpt.plan import TensorSource
from tune_ckpt.shards import meta_shard_files, open_meta_shards, tied_embeddings
from tune_ckpt.writing import write_text_atomic
from tune_models import FAMILIES, META_KEYS, DecoderConfig

FAMILY_FIELD = "family"
EMBEDDING, OUTPUT = META_KEYS["tok_embeddings.weight"], META_KEYS["output.weight"]
# Field -> the kind of its annotation ("int" of "int | None"), a string or a type.
_FIELDS = {f.name: (f.type if isinstance(f.type, str) else getattr(f.type, "__name__",
                                                                   str(f.type))).split(" | ")[0]
           for f in dataclasses.fields(DecoderConfig)}


def _check_json_types(args: Mapping, where: str) -> None:
    # DecoderConfig checks what its sizes mean; a JSON file can also hold the wrong kind of
    # value ("64" for 64), which it would trip over with a TypeError. The kinds come from its
    # annotations ("int | None" ...); every number of it is positive.
    for name, value in args.items():
        if value is None:
            continue
        kind = _FIELDS[name]
        if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)
                              or value <= 0):
            raise CheckpointError(f"{where}: '{name}' must be a positive integer, got {value!r}")
        if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                or value <= 0):
            raise CheckpointError(f"{where}: '{name}' must be a positive number, got {value!r}")
        if kind == "bool" and not isinstance(value, bool):
            raise CheckpointError(f"{where}: '{name}' must be true or false, got {value!r}")
        if kind.startswith("dict") and not isinstance(value, dict):
            raise CheckpointError(f"{where}: '{name}' must be an object, got {value!r}")


def config_from_args(args: Mapping, where: str = "model arguments") -> DecoderConfig:
    """DecoderConfig field names -> the config, every problem one CheckpointError line.

    Raises:
        CheckpointError: On an unknown field, a value of the wrong kind, or sizes that do not
            fit together.
    """
    unknown = sorted(set(args) - set(_FIELDS))
    if unknown:
        raise CheckpointError(
            f"{where}: unknown field '{unknown[0]}' (DecoderConfig fields: {', '.join(_FIELDS)})"
        )
    _check_json_types(args, where)
    try:
        return DecoderConfig(**args)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from e


def check_family(family: str, where: str) -> str:
    if family not in FAMILIES:
        raise CheckpointError(
            f"{where}: unknown model family '{family}' (known: {', '.join(FAMILIES)})"
        )
    return family


def read_json(path: Path) -> dict:
    """A JSON object from a file, or one CheckpointError line."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def read_sidecar(path: Path) -> tuple[DecoderConfig, str]:
    """tune_model.json -> (config, family); a file without a family (older tune) gets the
    likeliest one (see :func:`tune_ckpt.hf_config.family_for`)."""
    data = read_json(path)
    family = data.pop(FAMILY_FIELD, None)
    config = config_from_args(data, str(path))
    if family is None:
        return config, family_for(config)
    if not isinstance(family, str):
        raise CheckpointError(f"{path}: 'family' must be a family name, got {family!r}")
    return config, check_family(family, str(path))


def meta_model(params: dict, source: TensorSource | None,
               where: str = "params.json") -> tuple[DecoderConfig, str]:
    """Meta's params.json and what only the weights say (the vocabulary where params.json
    has -1, tied embeddings): (config, family). ``source`` None: no weights to ask."""
    vocab, tied = None, False
    if source is not None:
        if EMBEDDING in source.keys():
            vocab = source.shape(EMBEDDING)[0]
        tied = tied_embeddings(source, EMBEDDING, OUTPUT)
    return config_from_meta(params, vocab_size=vocab, tie_embeddings=tied, where=where)


def read_model(path: str | os.PathLike) -> tuple[DecoderConfig, str, Path]:
    """The model a checkpoint holds: (config, family name, the file that said so).

    Looks beside the checkpoint for ``tune_model.json``, else Meta's ``params.json`` (the
    vocabulary and tied embeddings read off consolidated.*.pth when they are there), else
    Hugging Face's ``config.json``.

    Raises:
        CheckpointError: If none of the three files is there or one is malformed.
    """
    path = Path(path).expanduser()
    folder = path if path.is_dir() else path.parent
    found = model_args_file(path)
    if found is None:
        raise CheckpointError(
            f"no {MODEL_ARGS_FILE}, {META_PARAMS_FILE} or {HF_CONFIG_FILE} in {folder}: cannot "
            "tell the model's shape (write one with tune_ckpt.write_model_args)"
        )
    if found.name == MODEL_ARGS_FILE:
        return (*read_sidecar(found), found)
    if found.name == META_PARAMS_FILE:
        data = read_json(found)
        source = None
        if any(folder.glob("consolidated.*.pth")):
            source = open_meta_shards(meta_shard_files(folder), data.get("vocab_size"))
        return (*meta_model(data, source, str(found)), found)
    return (*config_from_hf(read_json(found), str(found)), found)


def model_args_file(path: str | os.PathLike) -> Path | None:
    """The file a checkpoint's model is read from (see :func:`read_model`), or None.

    ``tune_model.json`` beside the checkpoint, else Meta's ``params.json``, else Hugging
    Face's ``config.json``: what an error about a shape that does not fit names.
    """
    path = Path(path).expanduser()
    folder = path if path.is_dir() else path.parent
    for name in (MODEL_ARGS_FILE, META_PARAMS_FILE, HF_CONFIG_FILE):
        if (folder / name).is_file():
            return folder / name
    return None


def read_model_args(path: str | os.PathLike) -> dict:
    """The model of a checkpoint, in tune_models.DecoderConfig field names.

    Looks beside the checkpoint for ``tune_model.json``, else Meta's ``params.json``, else
    Hugging Face's ``config.json``.

    Args:
        path: A checkpoint file or the folder holding it.

    Returns:
        ``vars(config)``: ``DecoderConfig(**args)`` builds the model the checkpoint holds.

    Raises:
        CheckpointError: If none of the three files is there or one is malformed.
    """
    return vars(read_model(path)[0])


def read_model_family(path: str | os.PathLike) -> str:
    """The family of a checkpoint's model (a key of ``tune_models.FAMILIES``).

    From ``tune_model.json``'s ``family``, else the HF architecture in config.json, else
    guessed from the model (see :func:`tune_ckpt.hf_config.family_for`).

    Raises:
        CheckpointError: As :func:`read_model_args`.
    """
    return read_model(path)[1]


def args_of(config: DecoderConfig) -> dict[str, Any]:
    """A model's shape as tune_model.json (and tune_adapter.json) hold it: every
    DecoderConfig field by name."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def write_model_args(folder: str | os.PathLike, args: Mapping | DecoderConfig, *,
                     family: str | None = None) -> Path:
    """Write ``tune_model.json`` (atomically) into ``folder``.

    Args:
        folder: The folder holding the native checkpoint.
        args: A DecoderConfig, or its field names -> values (e.g. ``vars(config)``); derived
            fields are filled in when absent.
        family: The model's family (a key of ``tune_models.FAMILIES``), recorded beside the
            fields so that exports and tools know it; None leaves it out.

    Returns:
        The path of the file written.

    Raises:
        CheckpointError: On an unknown field or family, or a bad value.
    """
    path = Path(folder).expanduser() / MODEL_ARGS_FILE
    config = args if isinstance(args, DecoderConfig) else config_from_args(args, str(path))
    data = args_of(config)
    if family is not None:
        data[FAMILY_FIELD] = check_family(family, str(path))
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
    return path
