"""LoRA and QLoRA in training: what a LoRA run's recipe does differently from a full one.

Three things differ, none of them the loop: how the model is built (the base loaded, frozen,
adapters added, the block linears quantised to NF4 for QLoRA: ``lora=`` and ``quantize=`` of
the one builder, tune_ckpt.building), which parameters train (the adapters only: the
optimizer gets the parameters that require grad), and what a checkpoint holds (the adapter
in PEFT's format, the optimizer state of the adapters and the training progress: MBs where
a full checkpoint is GBs). The base model is always the config's ``model_checkpoint``; a
resumed run reloads it and then the checkpoint's adapter.
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


def nf4_problem(quantize: str | None, dtype: str, device: torch.device) -> str | None:
    """Why an NF4 base cannot run in this dtype ("fp32", "bf16", "fp16") on this device,
    or None."""
    if quantize is None:
        return None
    if dtype == "fp16":
        # The NF4 base dequantises in the compute dtype; fp16 runs in fp32 master weights
        # under autocast, which NF4's own matmul would bypass.
        return ("quantize_base: nf4 computes in the model's dtype, and fp16 trains fp32 "
                "master weights under autocast; use dtype: bf16 on a GPU or fp32 on CPU")
    if dtype == "bf16" and device.type == "cpu":
        return ("quantize_base: nf4 with dtype: bf16 on CPU dequantises every weight in bf16 "
                "on every step (~30x slower than fp32 here); use dtype: fp32 on CPU, bf16 on a "
                "GPU")
    return None


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


def adapter_writer(state: dict[str, torch.Tensor], config, settings, *,
                   base_model: str | None, quantize_base: str | None
                   ) -> Callable[[Path], None]:
    """What writes an adapter into a folder in PEFT's format (adapter_config.json,
    adapter_model.safetensors) plus tune_adapter.json (the base's shape, NF4 or not): a
    checkpoint's model files, or the run's result in its output_dir.

    Args:
        state: The adapter weights (:func:`adapter_state`).
        config: The base model's DecoderConfig.
        settings: The adapters' LoRASettings.
        base_model: The base checkpoint, recorded as ``base_model_name_or_path``.
        quantize_base: "nf4" for a QLoRA adapter.
    """
    from tune_ckpt import save_peft_adapter

    def write(folder: Path) -> None:
        save_peft_adapter(folder, state, config=config, settings=settings,
                          base_model=base_model, quantize_base=quantize_base, force=True)

    return write


def resume_adapter(checkpoint: Path, config, settings):
    """Read every file of a LoRA checkpoint before anything is built from it.

    Args:
        checkpoint: The checkpoint folder.
        config: This run's model (DecoderConfig).
        settings: This run's adapters (LoRASettings).

    Returns:
        The checkpoint's adapter weights (native keys).

    Raises:
        RecipeError: A file is missing or damaged (named, with the checkpoint to fall back
            to), or the adapter is not one this run's model and settings can take.
    """
    from tune_ckpt import load_peft_adapter
    from tune_train import checkpointing as ckpt

    try:
        ckpt.TrainingState.read(checkpoint)
        ckpt.read_dcp_metadata(checkpoint / ckpt.TRAINING_STATE)
        ckpt.load_rng_state(checkpoint)
    except ckpt.DamagedCheckpointError as e:
        raise RecipeError(ckpt.damaged_message(checkpoint, e)) from e
    try:
        adapter = load_peft_adapter(checkpoint, config)
    except CheckpointError as e:
        raise RecipeError(f"cannot resume from {checkpoint}: {e}; resume with the model, "
                          "model_checkpoint and model_args it was trained with") from e
    found = adapter.settings
    if found != settings:
        raise RecipeError(
            f"{checkpoint} holds an adapter with rank {found.rank}, alpha {found.alpha:g}, "
            f"targets {','.join(found.targets)}; this run's are rank {settings.rank}, alpha "
            f"{settings.alpha:g}, targets {','.join(settings.targets)}: resume with the "
            "settings it was trained with")
    return adapter.weights


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
