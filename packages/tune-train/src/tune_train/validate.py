"""Checks a config can pass before any model is built: names and input files."""

from __future__ import annotations

import glob
from pathlib import Path

from tune_train.config import ConfigError, TrainConfig


def missing_files(cfg: TrainConfig) -> list[str]:
    """One message per input file the run needs that is not there."""
    problems = []
    if not Path(cfg.tokenizer_checkpoint).is_file() and not _tokenizer_creates_file(cfg):
        problems.append(
            f"tokenizer_checkpoint {cfg.tokenizer_checkpoint} does not exist; point it at the "
            "tokenizer.model that came with the model"
        )
    if cfg.model_checkpoint is not None and not Path(cfg.model_checkpoint).is_file():
        problems.append(
            f"model_checkpoint {cfg.model_checkpoint} does not exist; create it with `tune "
            "convert_checkpoint --checkpoint_path <download dir>/consolidated.00.pth`, or set "
            "model_checkpoint: null to start from random weights"
        )
    if cfg.chat_template is not None:
        problems += _chat_template_problems(cfg.chat_template)
    files = cfg.data_files if isinstance(cfg.data_files, list) else [cfg.data_files]
    for f in files:
        if f is not None and not Path(f).exists() and not glob.glob(f):
            problems.append(f"data_files {f} does not exist")
    return problems


def _chat_template_problems(value: str) -> list[str]:
    from tune_data import DataError, load_chat_template

    try:
        load_chat_template(value, tokenizer=None)  # a tokenizer only picks the default
    except DataError as e:
        return [str(e)]
    return []


def _tokenizer_creates_file(cfg: TrainConfig) -> bool:
    # The demo tokenizer is trained into tokenizer_checkpoint at first use. Only its name is
    # checked here, so `tune config validate` on other configs never needs the registry.
    return cfg.tokenizer == "demo_tokenizer"


def unknown_names(cfg: TrainConfig) -> list[str]:
    """One message per model/tokenizer/dataset/optimizer/loss name no registry holds."""
    from tune_train import registry

    problems = []
    for registry_dict, key in ((registry.MODELS, "model"), (registry.TOKENIZERS, "tokenizer"),
                               (registry.DATASETS, "dataset"), (registry.OPTIMIZERS, "optimizer"),
                               (registry.LOSSES, "loss")):
        try:
            registry.lookup(registry_dict, getattr(cfg, key), key)
        except ConfigError as e:
            problems.append(str(e))
    return problems


def dataset_argument_problems(cfg: TrainConfig) -> list[str]:
    """A message if the dataset builder cannot take the config's arguments (dataset_args)."""
    from tune_train import registry

    builder = registry.DATASETS.get(cfg.dataset)
    if builder is None:
        return []  # unknown_names reports it
    try:
        registry.dataset_arguments(builder, cfg)
    except ConfigError as e:
        return [str(e)]
    return []


def validate_config(cfg: TrainConfig) -> list[str]:
    """Every problem found, names first; an empty list means the run can start."""
    return unknown_names(cfg) + dataset_argument_problems(cfg) + missing_files(cfg)
