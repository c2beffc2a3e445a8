"""Everything a config can name, as plain dicts you can grep.

A config's ``model: llama2_7b`` is looked up in MODELS, ``optimizer: AdamW`` in OPTIMIZERS,
and so on; ``lookup`` turns a miss into one line with a did-you-mean. ``dataset_arguments``
is the one place that decides which config keys a dataset builder receives, and
and ``chat_template`` the one place that picks a model's chat format. A model family names
its tokenizer kind (``tune_models.ModelFamily.tokenizer``) in tune_data's vocabulary,
``tune_data.TOKENIZER_KINDS``, which also says which class reads it.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from tune_data import (
    DATASETS,
    TOKENIZER_KINDS,
    ChatTemplate,
    HFTokenizer,
    Llama3Tokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    demo_tokenizer,
    kind_of,
    load_chat_template,
    load_tokenizer,
)
from tune_models import MODELS, DecoderConfig, ModelFamily, family_of
from tune_train.config import (
    VALIDATION_KEYS,
    ConfigError,
    TrainConfig,
    validation_data_config,
)

# `tokenizer:` in a config -> what builds it from tokenizer_checkpoint. Each must fit the
# model's family (see tokenizer_fits).
TOKENIZERS: dict[str, Callable[..., Any]] = {
    # The default: the class the file needs, picked from its contents.
    "auto": load_tokenizer,
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

__all__ = ["DATASETS", "LOSSES", "MODELS", "OPTIMIZERS", "TOKENIZERS",
           "build_dataset", "build_tokenizer", "build_validation_dataset", "chat_template",
           "dataset_arguments",
           "family_tokenizer_files", "lookup", "model_config", "model_family", "token_ids_problem",
           "tokenizer_fits", "tokenizer_problem"]


def lookup(registry: dict[str, Any], name: str, key: str) -> Any:
    """registry[name], or a ConfigError naming the key, the value and the choices."""
    if name in registry:
        return registry[name]
    same_letters = [k for k in registry if k.lower() == name.lower()]
    close = same_letters or difflib.get_close_matches(name, list(registry), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"'{key}' is '{name}'{hint}; choose from {', '.join(sorted(registry))}")


def model_family(cfg: TrainConfig) -> ModelFamily:
    """The family of the config's model preset (tune_models.FAMILIES).

    Raises:
        ConfigError: If no preset has that name (with a did-you-mean).
    """
    lookup(MODELS, cfg.model, "model")
    return family_of(cfg.model)


def model_config(cfg: TrainConfig, vocab_size: int | None = None) -> DecoderConfig:
    """The model a config describes: its preset with ``model_args`` applied.

    A dict field such as ``rope_scaling`` is merged key by key, so
    ``model_args.rope_scaling.factor=16`` keeps the preset's other scaling fields.
    ``max_seq_len`` grows to the config's if the preset's is shorter.

    Args:
        cfg: The training config.
        vocab_size: The tokenizer's vocabulary size: a model trained from random weights
            (no model_checkpoint) gets exactly that many embedding rows unless model_args
            says otherwise; a checkpoint brings its own.

    Returns:
        The model's config.

    Raises:
        ConfigError: For an unknown preset, an unknown field in model_args, or values the
            model refuses (sizes that do not divide, an unknown rope_scaling type, ...).
    """
    preset = lookup(MODELS, cfg.model, "model")()
    fields = dict(vars(preset))
    overrides = dict(cfg.model_args)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(f"model_args has unknown field(s) {unknown}; the model's fields are "
                          f"{', '.join(sorted(fields))}")
    if cfg.model_checkpoint is None and vocab_size is not None and "vocab_size" not in overrides:
        overrides["vocab_size"] = vocab_size
    if "max_seq_len" not in overrides:
        overrides["max_seq_len"] = max(preset.max_seq_len, cfg.max_seq_len)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(fields[key], dict):
            overrides[key] = {**fields[key], **value}
    if {"dim", "multiple_of", "ffn_dim_multiplier"} & set(overrides):
        fields["hidden_dim"] = None  # re-derive the FFN width from the new sizes
    if {"dim", "n_heads"} & set(overrides):
        fields["head_dim"] = None  # likewise the head size (dim // n_heads)
    fields.update(overrides)
    try:
        return DecoderConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model_args: {e}") from e


def tokenizer_fits(tokenizer_class: type, family: ModelFamily) -> bool:
    """Whether a tokenizer of this class can serve a model of this family.

    A family reads its own kind of file, and a tokenizer.json, which the Hub publishes for
    every family (transformers reads it).
    """
    own = TOKENIZER_KINDS[family.tokenizer].reader
    return issubclass(tokenizer_class, (own, HFTokenizer))


def tokenizer_problem(cfg: TrainConfig) -> str | None:
    """Why the config's tokenizer cannot serve its model, or None; nothing is loaded.

    Checks the kind ``tokenizer:`` names, then the format of the tokenizer_checkpoint file
    (by its first bytes), against the model's family, and the file against the kind.

    Raises:
        ConfigError: If the model or tokenizer name is unknown.
    """
    family = model_family(cfg)
    builder = lookup(TOKENIZERS, cfg.tokenizer, "tokenizer")
    needs = family_tokenizer_files(family)
    if isinstance(builder, type) and not tokenizer_fits(builder, family):
        own = f"{family.name}_tokenizer"
        alternative = f" (or {own})" if own in TOKENIZERS else ""
        return (f"tokenizer '{cfg.tokenizer}' reads {_describe(builder)}, but model "
                f"'{cfg.model}' is a {family.name} model, which reads {needs}; set "
                f"tokenizer: auto{alternative}")
    found = _file_class(Path(cfg.tokenizer_checkpoint))
    if found is not None and not tokenizer_fits(found, family):
        return (f"tokenizer_checkpoint {cfg.tokenizer_checkpoint} is {_describe(found)}, but "
                f"model '{cfg.model}' is a {family.name} model, which reads {needs}; point "
                "tokenizer_checkpoint at the tokenizer that came with the model")
    if isinstance(builder, type) and found is not None and not issubclass(found, builder):
        return (f"tokenizer '{cfg.tokenizer}' reads {_describe(builder)}, but "
                f"tokenizer_checkpoint {cfg.tokenizer_checkpoint} is {_describe(found)}; set "
                "tokenizer: auto (it reads each file as what it is)")
    return None


def build_tokenizer(cfg: TrainConfig) -> Tokenizer:
    """The config's tokenizer, once :func:`tokenizer_problem` finds nothing wrong.

    Raises:
        ConfigError: If it does not fit the model's family (its kind, its file's format, or
            its BOS/EOS ids: :func:`token_ids_problem`).
        DataError: If the file is missing, damaged or of another kind than ``tokenizer:``.
    """
    problem = tokenizer_problem(cfg)
    if problem is not None:
        raise ConfigError(problem)
    tokenizer = TOKENIZERS[cfg.tokenizer](cfg.tokenizer_checkpoint)
    problem = token_ids_problem(tokenizer, model_family(cfg))
    if problem is not None:
        raise ConfigError(f"tokenizer_checkpoint {problem}; point tokenizer_checkpoint at the "
                          "tokenizer that came with the model")
    return tokenizer


def token_ids_problem(tokenizer: Tokenizer, family: ModelFamily) -> str | None:
    """Why a loaded tokenizer's BOS/EOS ids are not the ones the family's models were
    trained with (``family.hf_token_ids``), or None.

    A file of the right format can still be another model's (a tokenizer.json suits every
    family) or one whose ids moved: the model would then learn and stop at other tokens.
    The family's EOS need only be one the tokenizer stops at (Qwen2-Instruct's EOS is
    ``<|im_end|>``, its base model's ``<|endoftext|>``); a family's BOS is checked where the
    tokenizer puts one first (Qwen2's names a bos_token_id but none is ever added).
    """
    want_bos = family.hf_token_ids.get("bos_token_id")
    want_eos = family.hf_token_ids.get("eos_token_id")
    bos_wrong = tokenizer.bos_id is not None and want_bos is not None and (
        tokenizer.bos_id != want_bos)
    eos_wrong = want_eos is not None and want_eos not in (tokenizer.eos_id,
                                                          *tokenizer.stop_tokens)
    if not (bos_wrong or eos_wrong):
        return None

    def name(token_id: int | None) -> str:
        return "none" if token_id is None else f"{tokenizer.id_to_piece(token_id)} {token_id}"

    return (f"{tokenizer.path} has BOS {name(tokenizer.bos_id)} and EOS "
            f"{name(tokenizer.eos_id)}, but {family.name} models use BOS {want_bos} and EOS "
            f"{want_eos}: it is another model's tokenizer, or a damaged one")


def _describe(tokenizer_class: type) -> str:
    return kind_of(tokenizer_class).file


def family_tokenizer_files(family: ModelFamily) -> str:
    """The tokenizer files a family's model reads, in words (for messages)."""
    own = TOKENIZER_KINDS[family.tokenizer]
    if own.reader is HFTokenizer:
        return own.file
    return f"{own.file} or a tokenizer.json"


def _file_class(path: Path) -> type[Tokenizer] | None:
    """The tokenizer class a file needs, by its first bytes; None if it cannot be told."""
    from tune_data.tokenizers.base import sniff

    try:
        with path.open("rb") as f:
            kind = sniff(f.read(4096))
    except OSError:  # missing (reported elsewhere) or a folder
        return None
    return TOKENIZER_KINDS[kind].reader if kind in TOKENIZER_KINDS else None


# Builder parameter -> the config key that fills it. Every other builder parameter comes
# from dataset_args.
DATASET_KEYS = {
    "source": "dataset_source",
    "data_files": "data_files",
    "split": "dataset_split",
    "train_on_input": "train_on_input",
    "max_seq_len": "max_seq_len",
    "chat_template": "chat_template",
    "enable_thinking": "enable_thinking",
}
# Keys that mean something beyond the dataset (max_seq_len also sizes the model and packing;
# chat_template and enable_thinking also format `tune generate --chat` prompts): a builder
# without them simply does not need them.
_NOT_ONLY_DATA = {"max_seq_len", "chat_template", "enable_thinking"}


def dataset_arguments(builder: Callable[..., Any], cfg: TrainConfig,
                      names: Mapping[str, str] | None = None,
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
        names: The key a user wrote for each config key, where it differs (the validation
            data is chosen with ``validation_*`` keys); messages name those.

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
    names = names or {}
    dataset = f"{names.get('dataset', 'dataset')} '{cfg.dataset}'"
    args_key = names.get("dataset_args", "dataset_args")
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
            raise ConfigError(f"{args_key}.{key}: set it with the config key "
                              f"'{names.get(DATASET_KEYS[key], DATASET_KEYS[key])}' instead")
        if key not in named and not catch_all:
            takes = [n for n in named if n not in DATASET_KEYS]
            listed = ", ".join(takes) if takes else "none"
            raise ConfigError(f"{dataset} takes no argument '{key}' "
                              f"({args_key}.{key}); its arguments: {listed}")
        kwargs[key] = value
    for name, p in named.items():
        if not _has_default(p) and name not in kwargs:
            where = DATASET_KEYS[name] if name in DATASET_KEYS else f"{args_key}.{name}"
            raise ConfigError(f"{dataset} needs '{names.get(where, where)}'; set it in the "
                              "config")
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
        warn(_ignored_line(cfg, key, {}))
    return _build(builder, cfg, tokenizer, kwargs)


def build_validation_dataset(cfg: TrainConfig, tokenizer: Any,
                             warn: Callable[[str], None] | None = None) -> Any:
    """The validation set of a config that names a separate source, or None if it names none
    (see :func:`tune_train.config.validation_data_config`).

    It is built as the training set is; messages name the ``validation_*`` keys.

    Args:
        cfg: The training config.
        tokenizer: The tokenizer the builder encodes with.
        warn: Called with one line per validation key the builder ignores (the keys both
            sets share were reported for the training set).

    Returns:
        What the builder returns, or None.
    """
    view = validation_data_config(cfg)
    if view is None:
        return None
    builder = lookup(DATASETS, view.dataset, VALIDATION_KEYS["dataset"])
    kwargs, ignored = dataset_arguments(builder, view, VALIDATION_KEYS)
    for key in ignored if warn is not None else ():
        # Only what the user set for validation; inherited training values were reported.
        if key in VALIDATION_KEYS and getattr(view, VALIDATION_KEYS[key]) is not None:
            warn(_ignored_line(view, key, VALIDATION_KEYS))
    return _build(builder, view, tokenizer, kwargs)


def _build(builder: Callable[..., Any], cfg: TrainConfig, tokenizer: Any,
           kwargs: dict[str, Any]) -> Any:
    if "chat_template" in kwargs:  # a chat builder: the format the model's family uses
        kwargs = {**kwargs, "chat_template": chat_template(
            kwargs["chat_template"], tokenizer, model_family(cfg),
            kwargs.get("enable_thinking"))}
    return builder(tokenizer, **kwargs)


def chat_template(name: str | None, tokenizer: Tokenizer, family: ModelFamily | None,
                  enable_thinking: bool | None = None) -> ChatTemplate:
    """The chat format a model is trained and prompted in.

    The one named (``chat_template`` in a config, ``--chat-template``); else the model's own,
    shipped beside its tokenizer file (``chat_template.jinja`` or tokenizer_config.json);
    else its family's (``tune_models.ModelFamily.chat_template``: llama2, llama3, mistral,
    chatml, gemma); else, with no family known, the one the tokenizer's control tokens tell.

    Args:
        name: A built-in format, a .jinja / tokenizer_config.json file, or None.
        tokenizer: The model's tokenizer.
        family: The model's family, or None if unknown (a checkpoint without tune_model.json).
        enable_thinking: Passed to a template that reads it (Qwen3's); None: nothing.

    Raises:
        DataError: If ``name`` names nothing usable, no format can be told, or
            ``enable_thinking`` is set for a format without that switch.
    """
    return load_chat_template(name, tokenizer,
                              family.chat_template if family is not None else None,
                              enable_thinking=enable_thinking)


def _ignored_line(cfg: TrainConfig, key: str, names: Mapping[str, str]) -> str:
    name = names.get(key, key)  # a validation view keeps the validation_* keys as written
    return (f"{names.get('dataset', 'dataset')} '{cfg.dataset}' does not use '{name}'; {name}: "
            f"{getattr(cfg, name)!r} is ignored")
