"""LoRA and QLoRA in training: what the lora_finetune recipe changes in the full one.

Three things differ, none of them the loop: how the model is built (the base loaded, frozen,
adapters added, the block linears quantised to NF4 for QLoRA), which parameters train (the
adapters only: the optimizer gets the parameters that require grad), and what a checkpoint
holds (the adapter in PEFT's format, the optimizer state of the adapters and the training
progress: MBs where a full checkpoint is GBs). The base model is always the config's
``model_checkpoint``; a resumed run reloads it and then the checkpoint's adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tune_ckpt import CheckpointError
from tune_train.config import ConfigError, TrainConfig
from tune_train.errors import RecipeError


def lora_settings_of(cfg: TrainConfig, config=None):
    """The adapters a config asks for, as ``tune_models.LoRASettings``.

    Args:
        cfg: A config with ``lora_rank`` set.
        config: The model's DecoderConfig, to check the targets against it (``output``
            cannot be adapted with tied embeddings); None skips that check.

    Raises:
        ConfigError: One line for a rank, alpha or dropout out of range, or a target module
            tune cannot adapt (with the right name when another tool's was used).
    """
    from tune_models import LoRASettings
    from tune_models.lora import check_lora_targets

    try:
        settings = LoRASettings(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                                tuple(cfg.lora_target_modules))
        if config is not None:
            check_lora_targets(config, settings)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return settings


def recipe_problem(cfg: TrainConfig, lora: bool) -> str | None:
    """Why a config does not fit the recipe it was launched with, or None."""
    if lora and cfg.lora_rank is None:
        return ("lora_finetune trains LoRA adapters but lora_rank is not set; set lora_rank "
                "(e.g. 8) and lora_target_modules, or run full_finetune to train every weight")
    if not lora and cfg.lora_rank is not None:
        return (f"lora_rank is {cfg.lora_rank} but full_finetune trains every weight; run "
                "lora_finetune (tune run lora_finetune --config ...) to train adapters, or "
                "set lora_rank: null")
    return None


def nf4_problem(cfg: TrainConfig, device: torch.device) -> str | None:
    """Why NF4 cannot run with this config on this device, or None."""
    if cfg.quantize_base is None:
        return None
    if cfg.dtype == "fp16":
        # The NF4 base dequantises in the compute dtype; fp16 runs in fp32 master weights
        # under autocast, which NF4's own matmul would bypass.
        return ("quantize_base: nf4 computes in the model's dtype, and fp16 trains fp32 "
                "master weights under autocast; use dtype: bf16 on a GPU or fp32 on CPU")
    if cfg.dtype == "bf16" and device.type == "cpu":
        return ("quantize_base: nf4 with dtype: bf16 on CPU dequantises every weight in bf16 "
                "on every step (~30x slower than fp32 here); use dtype: fp32 on CPU, bf16 on a "
                "GPU")
    return None


def build_lora_model(
    config,
    settings,
    *,
    base: Path | None,
    read_weights: Callable[[Path, torch.nn.Module], dict[str, torch.Tensor]],
    quantize: str | None,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    prepare_layers: Callable[[torch.nn.Module], None] = lambda model: None,
) -> torch.nn.Module:
    """A Decoder with frozen base weights and fresh adapters, on ``device``.

    The base weights go from the mmap'd checkpoint straight into the model (no copy); with
    ``quantize`` the block linears are quantised one matrix at a time onto ``device``, so
    the full-precision base never exists there. The adapters are initialised last, in
    ``dtype`` on ``device``, from ``seed``: every process of a sharded run builds the same
    model as one process does.

    Args:
        config: The model's DecoderConfig.
        settings: The adapters (``lora_settings_of``).
        base: The base model's native checkpoint; None initialises it randomly from seed.
        read_weights: Reads and checks the checkpoint against a plain Decoder of the shape.
        quantize: "nf4" for QLoRA, else None.
        device: Where the model trains.
        dtype: The dtype of every floating-point tensor (the NF4 base excepted).
        seed: Seed of the random base and of the adapters.
        prepare_layers: Called on the plain Decoder before adapters are added (activation
            checkpointing, torch.compile of the blocks).

    Returns:
        The model; only its adapters require grad.
    """
    from tune_models import Decoder, apply_lora, quantize_base, reset_lora_parameters

    with torch.device("meta"):
        model = Decoder(config)
    model.to(dtype=dtype)  # read_weights casts the checkpoint to the model's dtype
    prepare_layers(model)
    if base is not None:
        model.load_state_dict(read_weights(base, model), assign=True)
    else:
        model.to_empty(device=device)
        torch.manual_seed(seed)
        with torch.no_grad():
            model.init_weights()
    apply_lora(model, rank=settings.rank, alpha=settings.alpha, dropout=settings.dropout,
               targets=settings.targets)
    if quantize is not None:
        quantize_base(model, quantize, device=device)
    model.to(device=device, dtype=dtype)  # floating tensors only: NF4's integers stay as are
    torch.manual_seed(seed)
    reset_lora_parameters(model)
    return model


def adapter_state(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The adapter weights, whole, in CPU memory (native keys).

    Under FSDP every process must call this (each adapter is gathered from its shards);
    those that pass ``keep=False`` get an empty dict.
    """
    from tune_models import is_lora_key

    state = {}
    for name, param in model.named_parameters():
        if not is_lora_key(name):
            continue
        whole = param.full_tensor() if hasattr(param, "full_tensor") else param
        if keep:
            state[name] = whole.detach().to("cpu", copy=True)
    return state


def save_adapter(folder: Path, state: dict[str, torch.Tensor], config, settings,
                 cfg: TrainConfig) -> Path:
    """Write the adapter into ``folder`` in PEFT's format (adapter_config.json,
    adapter_model.safetensors) plus tune_adapter.json (the base's shape, NF4 or not)."""
    from tune_ckpt import save_peft_adapter

    return save_peft_adapter(folder, state, config=config, settings=settings,
                             base_model=cfg.model_checkpoint, quantize_base=cfg.quantize_base,
                             force=True)


def check_adapter_checkpoint(checkpoint: Path, config):
    """Read every file of a LoRA checkpoint before anything is built from it.

    Returns:
        The checkpoint's adapter (``tune_ckpt.Adapter``).

    Raises:
        DamagedCheckpointError: Naming the file that is missing or damaged.
        RecipeError: The adapter is not one this run's model can take (another base shape).
    """
    from tune_ckpt import load_peft_adapter
    from tune_train import checkpointing as ckpt

    ckpt.read_trainer_state(checkpoint)
    ckpt.read_dcp_metadata(checkpoint / ckpt.TRAINING_STATE)
    ckpt.load_rng_state(checkpoint)
    try:
        return load_peft_adapter(checkpoint, config)
    except CheckpointError as e:
        raise RecipeError(f"cannot resume from {checkpoint}: {e}; resume with the model, "
                          "model_checkpoint and model_args it was trained with") from e


def load_adapter_weights(model: torch.nn.Module, adapter, settings, where: Path) -> None:
    """Put a checkpoint's adapter into a model built with ``settings``.

    Raises:
        RecipeError: The adapter was made with other settings (rank, alpha, targets).
    """
    from tune_models import load_lora_state_dict

    if adapter.settings != settings:
        raise RecipeError(
            f"{where} holds an adapter with rank {adapter.settings.rank}, alpha "
            f"{adapter.settings.alpha:g}, targets {','.join(adapter.settings.targets)}; this "
            f"run's are rank {settings.rank}, alpha {settings.alpha:g}, targets "
            f"{','.join(settings.targets)}: resume with the settings it was trained with")
    try:
        load_lora_state_dict(model, adapter.weights)
    except ValueError as e:
        raise RecipeError(f"{where}: {e}") from e


def resolve_adapter(path: str | Path) -> Path:
    """The adapter folder a user means: one holding adapter_config.json, else the latest
    checkpoint of a training output_dir (a run stopped before it wrote its final adapter).

    Raises:
        RecipeError: If neither holds an adapter.
    """
    from tune_ckpt.names import ADAPTER_CONFIG_FILE
    from tune_train.checkpointing import latest_checkpoint

    path = Path(path).expanduser()
    if (path / ADAPTER_CONFIG_FILE).is_file() or not path.is_dir():
        return path  # load_peft_adapter names what is wrong with it
    latest = latest_checkpoint(path)
    if latest is not None and (latest / ADAPTER_CONFIG_FILE).is_file():
        return latest
    return path


def apply_adapter(model: torch.nn.Module, config, adapter_path: str | Path) -> torch.nn.Module:
    """Base model + a PEFT adapter folder -> a plain Decoder with the adapter merged in.

    A QLoRA adapter (tune_adapter.json says nf4) is merged into the NF4-dequantised base it
    was trained on. Merging once makes generation and evaluation as fast as on the base.

    Raises:
        RecipeError: One line for a missing or foreign adapter, or one of another base model.
    """
    from tune_ckpt import load_peft_adapter
    from tune_models import apply_lora, load_lora_state_dict, merge_lora, quantize_base

    folder = resolve_adapter(adapter_path)
    try:
        adapter = load_peft_adapter(folder, config)
    except CheckpointError as e:
        raise RecipeError(str(e)) from e
    s = adapter.settings
    apply_lora(model, rank=s.rank, alpha=s.alpha, dropout=s.dropout, targets=s.targets)
    try:
        load_lora_state_dict(model, adapter.weights)
    except ValueError as e:
        raise RecipeError(f"{folder}: {e}") from e
    if adapter.quantize_base is not None:
        quantize_base(model, adapter.quantize_base)
    return merge_lora(model)
