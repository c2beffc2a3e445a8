"""Saving a native checkpoint: the weights file and, optionally, its ``tune_model.json``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from tune_ckpt.model_args import write_model_args
from tune_ckpt.reading import _check_state_dict
from tune_ckpt.writing import plans_from_dict, write_tensor_file
from tune_models import DecoderConfig


def save_native(
    sd: dict[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    model_args: Mapping | DecoderConfig | None = None,
    family: str | None = None,
) -> Path:
    """Write a native state dict atomically (temp name, fsync, rename), tensor by tensor.

    Args:
        sd: The state dict (native key schema).
        path: Target file; ``.pt`` writes the torch.save format, ``.safetensors`` safetensors.
            An existing file is replaced only once the new one is complete.
        model_args: If given (a DecoderConfig or its fields), also write ``tune_model.json``
            beside the file (see :func:`tune_ckpt.write_model_args`).
        family: The model's family, recorded in ``tune_model.json`` with ``model_args``.

    Returns:
        The path written.

    Raises:
        CheckpointError: Bad suffix, non-tensor values, or the disk is full.
    """
    path = Path(path).expanduser()
    _check_state_dict(sd, path)
    write_tensor_file(path, plans_from_dict(sd), force=True, progress=False)
    if model_args is not None:
        write_model_args(path.parent, model_args, family=family)
    return path
