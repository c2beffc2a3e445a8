"""Everything a config can name, as plain dicts you can grep.

A config's ``model: llama2_7b`` is looked up in MODELS, ``optimizer: AdamW`` in OPTIMIZERS,
and so on; ``lookup`` turns a miss into one line with a did-you-mean.
"""

from __future__ import annotations

import difflib
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
from tune_train.config import ConfigError

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

__all__ = ["DATASETS", "LOSSES", "MODELS", "OPTIMIZERS", "TOKENIZERS", "lookup"]


def lookup(registry: dict[str, Any], name: str, key: str) -> Any:
    """registry[name], or a ConfigError naming the key, the value and the choices."""
    if name in registry:
        return registry[name]
    same_letters = [k for k in registry if k.lower() == name.lower()]
    close = same_letters or difflib.get_close_matches(name, list(registry), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"'{key}' is '{name}'{hint}; choose from {', '.join(sorted(registry))}")
