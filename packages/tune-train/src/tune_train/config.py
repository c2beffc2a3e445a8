"""Training configuration: YAML onto a typed dataclass, with command-line overrides.

The YAML keys are the dataclass fields, flat as in the tutorial (``batch_size: 2``), with a
few nested groups reached by dotted keys (``wandb.project=my-run``, ``model_args.n_layers=2``).
Every value is checked against the field's type; an unknown key or a wrong type is a
:class:`ConfigError` whose message names the key and the fix. This module imports no torch,
so ``tune config validate`` and ``tune config show`` stay quick.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(Exception):
    """A mistake in a config file or override; the message is what the user sees."""


def _help(text: str, default: Any = MISSING, default_factory: Any = MISSING) -> Any:
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class WandbConfig:
    project: str = _help("Weights & Biases project.", "tune")
    entity: str | None = _help("Weights & Biases team or user; None = your default.", None)
    mode: Literal["online", "offline", "disabled"] = _help(
        "online, offline (sync later with `wandb sync`) or disabled.", "online"
    )
    run_name: str | None = _help("Run name; None lets W&B pick one.", None)


@dataclass
class TrainConfig:
    """Every key a training config may hold. Defaults are what an unset key means."""

    # --- the tutorial's keys ---
    dataset: str = _help("Dataset builder: alpaca, instruct, text_completion, ...", "alpaca")
    seed: int = _help("Seed for weights init, shuffling and dropout-free sampling.", 42)
    shuffle: bool = _help("Shuffle the samples every epoch (by seed and epoch).", True)
    model: str = _help(
        "Model preset, which also names its family, e.g. llama3_1_8b, qwen2_5_7b, qwen3_8b, "
        "gemma3_1b, mistral_7b; each family has a tiny one for tests (llama2_tiny, ...). "
        "tune_models.MODELS lists them all (a misspelt name gets the nearest).",
        "llama2_7b")
    model_checkpoint: str | None = _help(
        "Native checkpoint to start from (tune convert_checkpoint writes one, with "
        "tune_model.json beside it); it must hold the preset's family and shape. None starts "
        "from random weights.", None)
    tokenizer: str = _help(
        "Tokenizer kind: auto (from the file: the family's own, or a tokenizer.json), "
        "llama2_tokenizer, mistral_tokenizer, llama3_tokenizer, qwen2_tokenizer, hf_tokenizer, "
        "demo_tokenizer. It must fit the model's family.", "auto")
    tokenizer_checkpoint: str = _help(
        "Path of the model's tokenizer file: tokenizer.model (SentencePiece; Llama 3: "
        "original/tokenizer.model), tokenizer.json, or vocab.json (with merges.txt beside "
        "it).", "/tmp/llama2/tokenizer.model")
    batch_size: int = _help("Samples per micro-batch on each device.", 2)
    lr: float = _help("Peak learning rate.", 2e-5)
    epochs: int = _help("Passes over the dataset.", 1)
    optimizer: str = _help("Optimizer: SGD, Adam or AdamW.", "AdamW")
    loss: str = _help("Loss: CrossEntropyLoss (fused with the output layer, in chunks).",
                      "CrossEntropyLoss")
    output_dir: str = _help("Where checkpoints, metrics and plots go.",
                            "/tmp/alpaca-llama2-finetune")
    device: str = _help("cpu, cuda, cuda:N or auto (cuda when available).", "auto")
    dtype: Literal["fp32", "bf16", "fp16"] = _help(
        "fp32; bf16 (bf16 weights and optimizer state); fp16 (fp32 master weights, autocast "
        "and loss scaling).", "fp32")
    enable_fsdp: bool = _help("Shard the model with FSDP2 across the torchrun processes.", False)
    enable_activation_checkpointing: bool = _help(
        "Recompute each block's activations in backward: less memory, ~1/3 more compute.", False)
    resume_from_checkpoint: bool = _help(
        "Continue from the latest checkpoint in output_dir, mid-epoch if it was.", False)

    # --- data ---
    dataset_source: str | None = _help(
        "Hub dataset name or local file/folder; None = the builder's default.", None)
    data_files: str | list[str] | None = _help("Local data files (json, jsonl, csv, parquet).",
                                               None)
    dataset_split: str = _help("Split to train on.", "train")
    dataset_args: dict[str, Any] = _help(
        "Extra arguments to the dataset builder, e.g. column_map for instruct.",
        default_factory=dict)
    max_seq_len: int = _help("Samples are truncated to this many tokens.", 512)
    train_on_input: bool = _help("Also take loss on the prompt, not only the response.", False)
    chat_template: str | None = _help(
        "Chat format for dataset: chat (and generate --chat): llama2, llama3, chatml, mistral, "
        "gemma, or a .jinja / tokenizer_config.json file; None = the model's own or its "
        "family's.", None)
    enable_thinking: bool | None = _help(
        "Passed to a chat template that reads it (Qwen3's own): False puts an empty think "
        "block in each answer's prompt, so answers train (and generate --chat answers) "
        "without reasoning; None = the template's default. A format without the switch "
        "refuses it.", None)
    packing: bool = _help("Pack samples into max_seq_len rows (no padding; documents do not "
                          "attend to each other).", False)
    group_by_length: bool = _help("Batch samples of similar length together (less padding).",
                                  False)

    # --- validation ---
    validation_split: float | str | None = _help(
        "Validation data: a fraction in (0, 1) of the training records, held out by seed and "
        "never trained on; or the split (e.g. validation) of the validation source.", None)
    validation_dataset: str | None = _help(
        "Dataset builder of the validation data; None = dataset.", None)
    validation_dataset_source: str | None = _help(
        "Hub dataset or local file/folder of the validation data; None = the training source "
        "(another builder's default for another builder).", None)
    validation_data_files: str | list[str] | None = _help(
        "Local files of the validation data (json, jsonl, csv, parquet, txt).", None)
    validation_dataset_args: dict[str, Any] | None = _help(
        "Arguments to the validation builder; None = dataset_args (none for another builder).",
        None)
    eval_every_n_steps: int | None = _help(
        "Validate every N optimizer steps (and at every epoch end); needs validation data.",
        None)
    validation_max_batches: int | None = _help(
        "At most this many batches (of batch_size on each process) per validation; None = "
        "all.", None)
    save_best: bool = _help("Also keep checkpoints/best: the model with the lowest validation "
                            "loss so far.", False)

    # --- model ---
    model_args: dict[str, Any] = _help(
        "Overrides of the preset's fields, e.g. {n_layers: 2}; a dict field (rope_scaling) is "
        "merged key by key.", default_factory=dict)
    compile: bool = _help("torch.compile each transformer block.", False)
    fsdp_cpu_offload: bool = _help("With FSDP, keep parameters and optimizer state in CPU "
                                   "memory.", False)

    # --- LoRA and QLoRA (the lora_finetune recipe) ---
    lora_rank: int | None = _help(
        "Rank of the LoRA adapters lora_finetune trains (the base model stays frozen); "
        "None = no adapters (full_finetune).", None)
    lora_alpha: float = _help("Adapter outputs are scaled by lora_alpha / lora_rank.", 16.0)
    lora_dropout: float = _help("Dropout on the adapters' input while training, in [0, 1).",
                                0.0)
    lora_target_modules: list[str] = _help(
        "Where adapters go: any of q, k, v, o (attention), gate, up, down (MLP), output.",
        default_factory=lambda: ["q", "v"])
    quantize_base: Literal["nf4"] | None = _help(
        "nf4: QLoRA, the frozen base's block linears stored in 4-bit NormalFloat "
        "(double-quantised scales), computed in dtype; needs lora_rank. None = as loaded.",
        None)

    # --- optimisation ---
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", 1)
    max_steps_per_epoch: int | None = _help("Stop an epoch after this many optimizer steps.",
                                            None)
    lr_scheduler: Literal["constant", "cosine", "linear"] = _help(
        "Shape after warm-up: constant, cosine or linear decay to lr * min_lr_ratio.",
        "constant")
    warmup_steps: int = _help("Linear warm-up steps from 0 to lr.", 0)
    min_lr_ratio: float = _help("Final lr as a fraction of lr for cosine and linear.", 0.0)
    weight_decay: float = _help("Decoupled weight decay (AdamW) or L2 (SGD, Adam).", 0.0)
    max_grad_norm: float | None = _help("Clip the gradient norm to this; None = no clipping.",
                                        1.0)
    optimizer_args: dict[str, Any] = _help(
        "Extra optimizer arguments, e.g. {betas: [0.9, 0.95], momentum: 0.9}.",
        default_factory=dict)

    # --- checkpoints ---
    save_every_n_steps: int | None = _help(
        "Also checkpoint every N optimizer steps (besides every epoch end).", None)
    keep_last_n_checkpoints: int = _help("Older checkpoints are deleted.", 2)
    checkpoint_format: Literal["pt", "safetensors"] = _help(
        "Format of the model weights in each checkpoint.", "pt")

    # --- logging ---
    metric_loggers: list[str] = _help(
        "Any of stdout, jsonl, tensorboard, wandb.", default_factory=lambda: ["stdout", "jsonl"])
    log_every_n_steps: int = _help("Log metrics every N optimizer steps.", 1)
    wandb: WandbConfig = _help("Weights & Biases settings.", default_factory=WandbConfig)
    plot: bool = _help("Draw loss_curve.png in output_dir when training ends "
                       "(needs matplotlib).", True)


def config_keys(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every key, nested groups flattened with dots."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        key = prefix + f.name
        if is_dataclass(hints[f.name]):
            rows.extend(config_keys(hints[f.name], key + "."))
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        rows.append((key, _type_name(hints[f.name]), repr(default), f.metadata.get("help", "")))
    return rows


def config_reference_markdown() -> str:
    """Every key as a Markdown table (the README's reference is this, checked by a test)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, type_name, default, help_text in config_keys():
        type_name = type_name.replace(" | ", " or ")
        lines.append(f"| `{key}` | {type_name} | `{default}` | {help_text} |")
    return "\n".join(lines) + "\n"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return "None" if tp is type(None) else tp.__name__


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check value against type tp (accepting YAML 1.1 quirks); return it converted."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else _type_error(key, value, tp)
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"'{key}' is {value!r}, which is not one of {', '.join(map(repr, args))}{hint}"
        )
    if origin is list:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]  # `metric_loggers=wandb` on the command line means a list of one
        if not isinstance(value, list):
            raise _type_error(key, value, tp)
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(key, value, tp)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, value, tp)
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `2e-5` (no dot) as a string; it is plainly meant as a number.
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(key, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # e.g. `dataset_split: 2023` or a numeric run name
        raise _type_error(key, value, tp)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise _type_error(key, value, tp)
        return _build(tp, value, key + ".")
    raise ConfigError(f"internal: no checker for type {tp} of '{key}'")


def _type_error(key: str, value: Any, tp: Any) -> ConfigError:
    return ConfigError(f"'{key}' must be {_type_name(tp)}, got {value!r}")


def _unknown_key(key: str, prefix: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return ConfigError(
        f"unknown key '{prefix}{key}'{hint}; `tune config show --keys` lists every key"
    )


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key(str(key), prefix, names)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["lr=1e-4", "wandb.project=x"]`` into a nested dict with YAML-typed values."""
    result: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. batch_size=4)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw  # unparseable as YAML: keep the raw text, the type check decides
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' sets a key inside '{part}', a plain value")
        node[leaf] = value
    return result


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


CONFIG_DIR = Path(__file__).parent / "configs"


def builtin_configs() -> dict[str, Path]:
    """Configs shipped in the package, by name."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A file path as given, or the built-in config of that name.

    Raises:
        ConfigError: If it is neither.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtins = builtin_configs()
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if str(name_or_path) in builtins or (path.parent == Path(".") and name in builtins):
        return builtins[name]
    close = difflib.get_close_matches(name, list(builtins), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(
        f"config '{name_or_path}' is neither a file nor a built-in config{hint}; "
        "`tune config ls` lists the built-in ones"
    )


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of key: value lines")
    return data


def load_config(
    config: str | Path | dict[str, Any] | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """Build a TrainConfig from a YAML file, a built-in name or a dict, then overrides.

    Args:
        config: Path of a YAML file, name of a built-in config, a dict, or None (defaults).
        overrides: ``key=value`` strings; values are read as YAML, dotted keys reach nested
            groups.

    Returns:
        The checked config.

    Raises:
        ConfigError: On unknown keys, wrong types, or a bad file.
    """
    if config is None:
        data: dict[str, Any] = {}
    elif isinstance(config, dict):
        data = config
    else:
        data = read_yaml(resolve_config_path(config))
    data = _merge(data, parse_overrides(overrides or []))
    cfg = _build(TrainConfig, data)
    _check_values(cfg)
    return cfg


# The keys that choose the validation data, by the training data key each stands in for.
VALIDATION_KEYS = {
    "dataset": "validation_dataset",
    "dataset_source": "validation_dataset_source",
    "data_files": "validation_data_files",
    "dataset_split": "validation_split",
    "dataset_args": "validation_dataset_args",
}


def has_validation(cfg: TrainConfig) -> bool:
    """Whether the config asks for validation data (any validation key set)."""
    return any(getattr(cfg, key) is not None for key in VALIDATION_KEYS.values())


def validation_fraction(cfg: TrainConfig) -> float | None:
    """The fraction of the training records held out for validation, if that is the source."""
    split = cfg.validation_split
    return split if isinstance(split, float) else None


def validation_data_config(cfg: TrainConfig) -> TrainConfig | None:
    """The config with its data keys replaced by the validation ones, so the validation set is
    built as the training set is (same tokenizer, max_seq_len, train_on_input).

    Unset keys fall back as a user would read them: the builder to ``dataset``; the source to
    the training source, unless another source, files or builder is named; the split to
    ``train``; the builder arguments to ``dataset_args`` for the training builder.

    Returns:
        The derived config, or None when there is no separate validation source (no
        validation, or a fraction held out of the training records).
    """
    if not has_validation(cfg) or validation_fraction(cfg) is not None:
        return None
    dataset = cfg.validation_dataset or cfg.dataset
    if cfg.validation_dataset_source is not None or cfg.validation_data_files is not None:
        source, files = cfg.validation_dataset_source, cfg.validation_data_files
    elif dataset != cfg.dataset:
        source, files = None, None  # another builder: its own default source
    else:
        source, files = cfg.dataset_source, cfg.data_files
    args = cfg.validation_dataset_args
    if args is None:
        args = cfg.dataset_args if dataset == cfg.dataset else {}
    return replace(cfg, dataset=dataset, dataset_source=source, data_files=files,
                   dataset_split=cfg.validation_split or "train", dataset_args=args)


def _check_validation(cfg: TrainConfig) -> None:
    for key in ("eval_every_n_steps", "validation_max_batches"):
        value = getattr(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"'{key}' must be positive or null, got {value}")
    if not has_validation(cfg):
        for key in ("eval_every_n_steps", "validation_max_batches", "save_best"):
            if getattr(cfg, key) not in (None, False):
                raise ConfigError(f"'{key}' is set but there is no validation data; set "
                                  "validation_split: 0.05 (hold out 5% of the training "
                                  "records) or validation_data_files")
        return
    fraction = validation_fraction(cfg)
    if fraction is not None:
        if not (math.isfinite(fraction) and 0.0 < fraction < 1.0):
            raise ConfigError(f"'validation_split' is {fraction}; as the fraction of the "
                              "training records to hold out it must be between 0 and 1, e.g. "
                              "0.05 (or name a split, e.g. validation)")
        for key in VALIDATION_KEYS.values():
            if key != "validation_split" and getattr(cfg, key) is not None:
                raise ConfigError(
                    f"'validation_split: {fraction}' holds out part of the training data and "
                    f"'{key}' names separate validation data; set only one of them (with "
                    "separate data, validation_split may name its split)")
        return
    if cfg.validation_split is not None and not cfg.validation_split.strip():
        raise ConfigError("'validation_split' is empty; name a split (e.g. validation) or a "
                          "fraction (e.g. 0.05)")
    view = validation_data_config(cfg)
    if all(getattr(view, key) == getattr(cfg, key) for key in VALIDATION_KEYS):
        raise ConfigError(
            f"the validation data would be the training data (dataset '{cfg.dataset}', split "
            f"'{cfg.dataset_split}'); set validation_split to a fraction to hold out (e.g. "
            "0.05) or to another split, or point validation_data_files at other data")


def _check_values(cfg: TrainConfig) -> None:
    positive = ["batch_size", "epochs", "max_seq_len", "gradient_accumulation_steps",
                "log_every_n_steps", "keep_last_n_checkpoints"]
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"'{key}' must be positive, got {getattr(cfg, key)}")
    for key in ("max_steps_per_epoch", "save_every_n_steps"):
        value = getattr(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"'{key}' must be positive or null, got {value}")
    # YAML reads `.nan`, `inf` and `1e999` as numbers (and `nan` is accepted as a float
    # string): none of them trains, and each would only fail, or silently diverge, later.
    for key in ("lr", "min_lr_ratio", "weight_decay", "max_grad_norm"):
        value = getattr(cfg, key)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"'{key}' must be a finite number, got {value}")
    if cfg.lr <= 0:
        raise ConfigError(f"'lr' must be positive, got {cfg.lr}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ConfigError(f"'min_lr_ratio' is the final lr as a fraction of lr and must be "
                          f"between 0 and 1, got {cfg.min_lr_ratio}")
    if cfg.weight_decay < 0:
        raise ConfigError(f"'weight_decay' must be >= 0, got {cfg.weight_decay}")
    if cfg.max_grad_norm is not None and cfg.max_grad_norm <= 0:
        raise ConfigError(f"'max_grad_norm' must be positive, or null for no clipping, got "
                          f"{cfg.max_grad_norm}")
    if cfg.warmup_steps < 0:
        raise ConfigError(f"'warmup_steps' must be >= 0, got {cfg.warmup_steps}")
    if cfg.seed < 0:
        raise ConfigError(f"'seed' must be >= 0, got {cfg.seed}")
    known_loggers = ["stdout", "jsonl", "tensorboard", "wandb"]
    for name in cfg.metric_loggers:
        if name not in known_loggers:
            close = difflib.get_close_matches(name, known_loggers, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown metric logger '{name}'{hint}; choose from {', '.join(known_loggers)}"
            )
    if cfg.device != "auto" and not (
        cfg.device in ("cpu", "cuda") or cfg.device.startswith("cuda:")
    ):
        raise ConfigError(f"'device' is '{cfg.device}'; use cpu, cuda, cuda:N or auto")
    if cfg.quantize_base is not None and cfg.lora_rank is None:
        raise ConfigError(f"'quantize_base: {cfg.quantize_base}' stores the frozen base in 4 "
                          "bits, and only LoRA leaves the base frozen: set lora_rank (e.g. 8) "
                          "and run lora_finetune, or set quantize_base: null")
    _check_validation(cfg)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)


def dump_config(cfg: TrainConfig) -> str:
    """The config as YAML that load_config reads back to an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
