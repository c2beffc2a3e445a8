"""Everything a config can name, as plain dicts you can grep.

A config's ``model: llama2_7b`` is looked up in MODELS, ``optimizer: AdamW`` in OPTIMIZERS,
and so on; ``lookup`` turns a miss into one line with a did-you-mean. ``dataset_arguments``
is the one place that decides which config keys a dataset builder receives.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Callable
from typing import Any

import torch

from tune_data import (
    DATASETS,
    HFTokenizer,
    Llama3Tokenizer,
    SentencePieceTokenizer,
    demo_tokenizer,
)
from tune_models import MODELS
from tune_train.config import ConfigError, TrainConfig

# Each takes the tokenizer file (tokenizer_checkpoint); tune_data.load_tokenizer picks the
# same implementations from a file's contents.
TOKENIZERS: dict[str, Callable[..., Any]] = {
    "llama2_tokenizer": SentencePieceTokenizer,  # tokenizer.model
    "mistral_tokenizer": SentencePieceTokenizer,  # tokenizer.model
    "llama3_tokenizer": Llama3Tokenizer,  # Meta's tiktoken tokenizer.model (original/ on the Hub)
    "qwen2_tokenizer": HFTokenizer,  # tokenizer.json (+ tokenizer_config.json beside it)
    "hf_tokenizer": HFTokenizer,  # any family's tokenizer.json
    # Trains a small SentencePiece model on generated text at first use (the offline demo).
    "demo_tokenizer": demo_tokenizer,
}

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "SGD": torch.optim.SGD,
    "Adam": torch.optim.Adam,
    "AdamW": torch.optim.AdamW,
}


def _cross_entropy(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # The output projection and the loss run fused, in chunks (tune_models.loss): the fp32
    # logits of the whole batch never exist. Returns the summed token loss.
    return model(batch["tokens"], input_pos=batch.get("input_pos"), mask=batch.get("mask"),
                 labels=batch["labels"])


LOSSES: dict[str, Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]] = {
    "CrossEntropyLoss": _cross_entropy,
}

__all__ = ["DATASETS", "LOSSES", "MODELS", "OPTIMIZERS", "TOKENIZERS", "build_dataset",
           "dataset_arguments", "lookup"]


def lookup(registry: dict[str, Any], name: str, key: str) -> Any:
    """registry[name], or a ConfigError naming the key, the value and the choices."""
    if name in registry:
        return registry[name]
    same_letters = [k for k in registry if k.lower() == name.lower()]
    close = same_letters or difflib.get_close_matches(name, list(registry), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"'{key}' is '{name}'{hint}; choose from {', '.join(sorted(registry))}")


# Builder parameter -> the config key that fills it. Every other builder parameter comes
# from dataset_args.
DATASET_KEYS = {
    "source": "dataset_source",
    "data_files": "data_files",
    "split": "dataset_split",
    "train_on_input": "train_on_input",
    "max_seq_len": "max_seq_len",
    "chat_template": "chat_template",
}
# Keys that mean something beyond the dataset (max_seq_len also sizes the model and packing;
# chat_template also formats `tune generate --chat` prompts): a builder without them simply
# does not need them.
_NOT_ONLY_DATA = {"max_seq_len", "chat_template"}


def dataset_arguments(builder: Callable[..., Any], cfg: TrainConfig,
                      ) -> tuple[dict[str, Any], list[str]]:
    """The keyword arguments a dataset builder takes from a config.

    A builder receives only the parameters its signature names (after the tokenizer): the
    data keys of the config (``dataset_source`` as ``source``, ``data_files``,
    ``dataset_split`` as ``split``, ``train_on_input``, ``max_seq_len``,
    ``chat_template``) and ``dataset_args``. A ``**kwargs`` catch-all (passed on to
    ``datasets.load_dataset``) accepts extra ``dataset_args``, never the data keys it does
    not name.

    Args:
        builder: A dataset builder, e.g. ``DATASETS["alpaca"]``.
        cfg: The training config.

    Returns:
        ``(kwargs, ignored)``: the arguments, and the data keys the config sets to something
        other than their default although the builder does not take them.

    Raises:
        ConfigError: If ``dataset_args`` names a parameter the builder does not take, or one
            of the data keys, or if the builder needs a value the config does not give.
    """
    parameters = list(inspect.signature(builder).parameters.values())[1:]  # after tokenizer
    named = {p.name: p for p in parameters
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    catch_all = any(p.kind is p.VAR_KEYWORD for p in parameters)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    kwargs: dict[str, Any] = {}
    ignored = []
    for param, key in DATASET_KEYS.items():
        value = getattr(cfg, key)
        if param in named:
            # An unset dataset_source leaves the builder its default source, if it has one.
            if key == "dataset_source" and value is None and _has_default(named[param]):
                continue
            kwargs[param] = value
        elif value != defaults[key] and key not in _NOT_ONLY_DATA:
            ignored.append(key)
    for key, value in cfg.dataset_args.items():
        if key in DATASET_KEYS:
            raise ConfigError(f"dataset_args.{key}: set it with the config key "
                              f"'{DATASET_KEYS[key]}' instead")
        if key not in named and not catch_all:
            takes = [n for n in named if n not in DATASET_KEYS]
            listed = ", ".join(takes) if takes else "none"
            raise ConfigError(f"dataset '{cfg.dataset}' takes no argument '{key}' "
                              f"(dataset_args.{key}); its arguments: {listed}")
        kwargs[key] = value
    for name, p in named.items():
        if not _has_default(p) and name not in kwargs:
            where = DATASET_KEYS.get(name, f"dataset_args.{name}")
            raise ConfigError(f"dataset '{cfg.dataset}' needs '{where}'; set it in the config")
    return kwargs, ignored


def _has_default(parameter: inspect.Parameter) -> bool:
    return parameter.default is not inspect.Parameter.empty


def build_dataset(cfg: TrainConfig, tokenizer: Any,
                  warn: Callable[[str], None] | None = None) -> Any:
    """The config's dataset, built with the arguments :func:`dataset_arguments` picks.

    Args:
        cfg: The training config.
        tokenizer: The tokenizer the builder encodes with.
        warn: Called with one line per config key the builder ignores.

    Returns:
        What the builder returns (a ``tune_data.TokenizedDataset``).
    """
    builder = lookup(DATASETS, cfg.dataset, "dataset")
    kwargs, ignored = dataset_arguments(builder, cfg)
    for key in ignored if warn is not None else ():
        warn(f"dataset '{cfg.dataset}' does not use '{key}'; {key}: {getattr(cfg, key)!r} is "
             "ignored")
    return builder(tokenizer, **kwargs)
