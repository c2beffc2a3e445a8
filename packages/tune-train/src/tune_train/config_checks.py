"""Checks of a training config before any model is built (``tune config validate`` and every
recipe's start): names, input files, whether the model's tokenizer and checkpoint belong to
its family, and whether the config fits the recipe. (The validation *loss* is
tune_train.validation.)"""

from __future__ import annotations

import glob
import math
import os
from pathlib import Path

from tune_train.config import VALIDATION_KEYS, ConfigError, TrainConfig, validation_data_config


def missing_files(cfg: TrainConfig) -> list[str]:
    """One message per input file the run needs that is not there."""
    problems = []
    if not Path(cfg.tokenizer_checkpoint).is_file() and not _tokenizer_creates_file(cfg.tokenizer):
        problems.append(
            f"tokenizer_checkpoint {cfg.tokenizer_checkpoint} does not exist; point it at the "
            "tokenizer file (tokenizer.model, tokenizer.json or vocab.json) that came with the "
            "model"
        )
    if cfg.model_checkpoint is not None and not Path(cfg.model_checkpoint).is_file():
        problems.append(
            f"model_checkpoint {cfg.model_checkpoint} does not exist; create it with `tune "
            "convert_checkpoint --checkpoint_path <download dir>/consolidated.00.pth`, or set "
            "model_checkpoint: null to start from random weights"
        )
    if cfg.chat_template is not None:
        problems += _chat_template_problems(cfg.chat_template, cfg.enable_thinking)
    for key in ("data_files", "validation_data_files"):
        value = getattr(cfg, key)
        for f in value if isinstance(value, list) else [value]:
            if f is not None and not Path(f).exists() and not glob.glob(f):
                problems.append(f"{key} {f} does not exist")
    return problems


def _chat_template_problems(value: str, enable_thinking: bool | None) -> list[str]:
    from tune_data import DataError, load_chat_template

    try:  # a tokenizer only picks the default
        load_chat_template(value, tokenizer=None, enable_thinking=enable_thinking)
    except DataError as e:
        return [str(e)]
    return []


def _tokenizer_creates_file(kind: str) -> bool:
    # The demo tokenizer is trained into tokenizer_checkpoint at first use. Only its name is
    # checked here, so `tune config validate` on other configs never needs the registry.
    return kind == "demo_tokenizer"


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


# The DecoderConfig fields that decide which parameters a model has and their shapes: two
# models agreeing on these load each other's weights.
SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "hidden_dim", "qkv_bias", "tie_embeddings", "qk_norm", "post_norms")


def model_problems(cfg: TrainConfig) -> list[str]:
    """Messages for model_args the model refuses (e.g. an unknown rope_scaling type), a
    tokenizer that does not fit the model's family, and a model_checkpoint of another
    family or shape. Nothing is loaded: only file headers and tune_model.json are read."""
    from tune_train import registry

    if cfg.model not in registry.MODELS:
        return []  # unknown_names reports it
    try:
        config = registry.model_config(cfg)
    except ConfigError as e:
        return [str(e)]
    problems = [lora_problem(cfg, config), checkpoint_problem(cfg, config),
                memory_problem(cfg, config)]
    if cfg.tokenizer in registry.TOKENIZERS:  # else unknown_names reports it
        problems.insert(0, registry.tokenizer_problem(cfg))
    return [p for p in problems if p is not None]


def recipe_problem(recipe: str, lora: bool | None, lora_rank: int | None) -> str | None:
    """Why a config does not fit the recipe it was launched with, or None.

    Args:
        recipe: The recipe's name, for messages.
        lora: True if the recipe trains adapters only, False if every weight, None if either.
        lora_rank: The config's lora_rank.
    """
    if lora and lora_rank is None:
        return (f"{recipe} trains LoRA adapters but lora_rank is not set; set lora_rank "
                "(e.g. 8) and lora_target_modules, or run full_finetune to train every weight")
    if lora is False and lora_rank is not None:
        return (f"lora_rank is {lora_rank} but {recipe} trains every weight; run "
                "lora_finetune (tune run lora_finetune --config ...) to train adapters, or "
                "set lora_rank: null")
    return None


def lora_problem(cfg: TrainConfig, config) -> str | None:
    """Why the LoRA keys cannot build adapters on the config's model (rank 0, an unknown
    target module, ``output`` with tied embeddings, ...), or None. The rules are
    ``tune_models``' own (:func:`tune_train.lora.lora_settings_of`)."""
    from tune_train.lora import lora_settings_of

    if cfg.lora_rank is None:
        return None
    try:
        lora_settings_of(cfg, config)
    except ConfigError as e:
        return str(e)
    return None


def checkpoint_problem(cfg: TrainConfig, config) -> str | None:
    """Why cfg.model_checkpoint does not hold the config's model, by its tune_model.json.

    The family recorded there (its ``family`` key) must be the preset's; otherwise its shape
    must be the model's (:data:`SHAPE_FIELDS`); a preset of that shape is named. Without a
    tune_model.json nothing is said here: the recipe compares the tensors themselves.

    Args:
        cfg: The training config.
        config: The model it builds (``registry.model_config(cfg)``).
    """
    from tune_ckpt.names import MODEL_ARGS_FILE
    from tune_models import FAMILIES, MODELS, family_of
    from tune_train.errors import RecipeError
    from tune_train.loading import checkpoint_config, checkpoint_family

    if cfg.model_checkpoint is None:
        return None
    path = Path(cfg.model_checkpoint)
    if not (path.parent / MODEL_ARGS_FILE).is_file():
        return None
    family = family_of(cfg.model)
    found_family = checkpoint_family(path)
    if found_family is not None and found_family != family.name:
        if found_family not in FAMILIES:
            return (f"model_checkpoint {path} is a '{found_family}' checkpoint (its "
                    f"{MODEL_ARGS_FILE} says so), a family tune does not know "
                    f"({', '.join(FAMILIES)})")
        presets = ", ".join(FAMILIES[found_family].presets)
        return (f"model_checkpoint {path} is a {found_family} checkpoint (its {MODEL_ARGS_FILE} "
                f"says so), but model '{cfg.model}' is a {family.name} model; set model to a "
                f"{found_family} preset ({presets}) or point model_checkpoint at a "
                f"{family.name} checkpoint")
    try:
        found = checkpoint_config(path)
    except RecipeError as e:
        return str(e)
    differ = [f for f in SHAPE_FIELDS if getattr(found, f) != getattr(config, f)]
    if not differ:
        return None
    has = ", ".join(f"{f} {getattr(found, f)}" for f in differ)
    wants = ", ".join(str(getattr(config, f)) for f in differ)
    same = [name for name, preset in MODELS.items()
            if all(getattr(preset(), f) == getattr(found, f) for f in SHAPE_FIELDS)]
    if cfg.model in same:
        fix = f"that is {cfg.model}'s own shape: remove those model_args"
    elif same:
        fix = f"that is the shape of {same[0]} ({family_of(same[0]).name}): set model: {same[0]}"
    else:
        fix = "set model (and model_args) to the checkpoint's model"
    return (f"model_checkpoint {path} holds another model than '{cfg.model}' "
            f"({family.name}): its {MODEL_ARGS_FILE} has {has} where '{cfg.model}' has "
            f"{wants}; {fix}")


def memory_problem(cfg: TrainConfig, config) -> str | None:
    """Why a model trained from random weights cannot be held where it would train, or None.

    The estimate is the parameters alone (``tune_models.native_shapes`` times the bytes of
    cfg.dtype; gradients and optimizer state come on top), against the machine's memory:
    the GPU's (all visible GPUs' with enable_fsdp) for a CUDA device, else RAM. It catches a
    typo such as ``dim: 1048576`` before a build that would end in an allocation error or in
    the kernel killing the run; a checkpoint's model is checked against its tensors instead.
    """
    import dataclasses

    from tune_models import DTYPES, native_shapes

    if cfg.model_checkpoint is not None or cfg.dtype not in DTYPES:
        return None
    # One block's shapes times the depth: listing every block of a deep model costs memory too.
    one_block = native_shapes(dataclasses.replace(config, n_layers=1))
    sizes = {k: math.prod(shape) for k, shape in one_block.items()}
    block = sum(n for k, n in sizes.items() if k.startswith("layers."))
    parameters = sum(sizes.values()) - block + block * config.n_layers
    needed = parameters * DTYPES[cfg.dtype].itemsize
    available, where = _memory_for(cfg)
    if available is None or needed <= available:
        return None
    what = f"model '{cfg.model}'" + (" with these model_args" if cfg.model_args else "")
    fix = ("check model_args (n_layers, dim, hidden_dim, vocab_size, ...)" if cfg.model_args
           else "use a smaller model or a machine with more memory")
    return (f"{what} has {parameters / 1e9:,.1f} B parameters: {_size(needed)} in "
            f"{cfg.dtype} for the weights alone, more than {where} ({_size(available)}); {fix}")


def _memory_for(cfg: TrainConfig) -> tuple[int | None, str]:
    """(bytes, what they are) of the memory a run's weights live in."""
    import torch

    if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            return None, ""  # the recipe says no GPU is visible
        if cfg.enable_fsdp and torch.cuda.device_count() > 1:
            count = torch.cuda.device_count()
            total = sum(torch.cuda.get_device_properties(i).total_memory for i in range(count))
            return total, f"the memory of the {count} visible GPUs"
        index = torch.device(cfg.device).index if cfg.device != "auto" else None
        index = index or 0
        return torch.cuda.get_device_properties(index).total_memory, \
            f"the memory of GPU {index}"
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None, ""
    try:  # a container's limit (cgroup v2), when it is lower
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        ram = min(ram, int(limit)) if limit.isdigit() else ram
    except OSError:
        pass
    return ram, "this machine's memory"


def _size(n: int) -> str:
    return f"{n / 1e12:,.1f} TB" if n >= 1e12 else f"{n / 1e9:,.1f} GB"


def validate_config(cfg: TrainConfig) -> list[str]:
    """Every problem found, names first; an empty list means the run can start."""
    return (unknown_names(cfg) + dataset_argument_problems(cfg) + model_problems(cfg)
            + missing_files(cfg))
