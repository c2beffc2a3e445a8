"""Checks a config can pass before any model is built: names and input files."""

from __future__ import annotations

import glob
from pathlib import Path

from tune_train.config import VALIDATION_KEYS, ConfigError, TrainConfig, validation_data_config


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
    for key in ("data_files", "validation_data_files"):
        value = getattr(cfg, key)
        for f in value if isinstance(value, list) else [value]:
            if f is not None and not Path(f).exists() and not glob.glob(f):
                problems.append(f"{key} {f} does not exist")
    return problems


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
    if cfg.validation_dataset is not None:
        try:
            registry.lookup(registry.DATASETS, cfg.validation_dataset, "validation_dataset")
        except ConfigError as e:
            problems.append(str(e))
    return problems


def dataset_argument_problems(cfg: TrainConfig) -> list[str]:
    """A message per dataset builder (training, validation) that cannot take the config's
    arguments (dataset_args, validation_dataset_args)."""
    from tune_train import registry

    problems = []
    validation = validation_data_config(cfg)
    for view, names in ((cfg, None), (validation, VALIDATION_KEYS)):
        builder = registry.DATASETS.get(view.dataset) if view is not None else None
        if builder is None:
            continue  # no validation source, or an unknown name (unknown_names reports it)
        try:
            registry.dataset_arguments(builder, view, names)
        except ConfigError as e:
            problems.append(str(e))
    return problems


def validate_config(cfg: TrainConfig) -> list[str]:
    """Every problem found, names first; an empty list means the run can start."""
    return unknown_names(cfg) + dataset_argument_problems(cfg) + missing_files(cfg)
