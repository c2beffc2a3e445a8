"""LoRA and QLoRA in training: what the lora_finetune recipe changes in the full one.

Three things differ, none of them the loop: how the model is built (the base loaded, frozen,
adapters added, the block linears quantised to NF4 for QLoRA), which parameters train (the
adapters only: the optimizer gets the parameters that require grad), and what a checkpoint
holds (the adapter in PEFT's format, the optimizer state of the adapters and the training
progress: MBs where a full checkpoint is GBs). The base model is always the config's
``model_checkpoint``; a resumed run reloads it and then the checkpoint's adapter.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Mapping
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


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
_MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_blocks_to_os() -> bool:
    """Make glibc serve every allocation of 1 MiB or more with its own mmap (Linux only).

    An NF4 base on CPU dequantises each weight for each matmul, forward and backward: many
    short-lived blocks of tens of MB between the long-lived activations. glibc's default
    (its mmap threshold rises to 32 MB after the first large free) puts them on the heap,
    where the freed ones cannot go back to the OS while a live block sits above them; a
    QLoRA step of an 8B model then holds ~1.5 GB more than it uses. With the threshold fixed
    at 1 MiB each such block is unmapped when freed. Same effect as the environment variable
    MALLOC_MMAP_THRESHOLD_=1048576, which only works when set before the process starts.

    Returns:
        Whether the setting was applied (False off glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


class RandomBase(Mapping):
    """Native key -> that weight of a random base model (``Decoder.init_weights``' kind),
    made on request on ``device``: each from a generator seeded by ``seed`` and the key's
    place, so the numbers are the same whichever order and whichever process asks."""

    def __init__(self, model: torch.nn.Module, seed: int, device: torch.device):
        self.shapes = {k: (tuple(p.shape), p.dtype) for k, p in model.named_parameters()}
        self.index = {k: i for i, k in enumerate(self.shapes)}
        self.n_layers, self.seed, self.device = len(model.layers), seed, device

    def __getitem__(self, key: str) -> torch.Tensor:
        from tune_models import init_parameter_

        shape, dtype = self.shapes[key]
        generator = torch.Generator(self.device).manual_seed(self.seed * 100_003 + self.index[key])
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        with torch.no_grad():
            return init_parameter_(tensor, key, self.n_layers, generator=generator)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def build_lora_model(
    config,
    settings,
    *,
    base: Path | None,
    read_weights: Callable[[Path, torch.nn.Module], Mapping[str, torch.Tensor]] | None = None,
    quantize: str | None,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    prepare_layers: Callable[[torch.nn.Module], None] = lambda model: None,
    shard: Callable[[torch.nn.Module], None] | None = None,
    adapter=None,
    adapter_source: Path | None = None,
) -> torch.nn.Module:
    """A Decoder with frozen base weights and adapters, on ``device``, built one weight at
    a time so that no process ever holds more of the model than it trains with.

    The model is made on the meta device, adapters added and (``quantize``) the block
    linears given NF4 parameters; with ``shard`` it is sharded there (FSDP2). Then each
    weight is read from the mmap'd checkpoint (or made, ``base`` None), cast or quantised
    on ``device``, and kept whole (one process: a weight already in ``dtype`` on the CPU is
    the mmap'd tensor itself, no copy) or only this process's shard of it. A 70B base under
    8 processes never exists whole on any GPU, and the full-precision base never exists at
    all under QLoRA. The adapters are made whole from ``seed`` (or taken from ``adapter``),
    so every process builds the model one process builds, sharded or not.

    Args:
        config: The model's DecoderConfig.
        settings: The adapters (``lora_settings_of``).
        base: The base model's native checkpoint; None makes a random base from ``seed``.
        read_weights: Reads ``base`` (lazily, not cast) and checks it against a plain
            Decoder of the shape.
        quantize: "nf4" for QLoRA, else None.
        device: Where the model's tensors go.
        dtype: The dtype of every floating-point tensor (the NF4 base excepted).
        seed: Seed of the random base and of the adapters.
        prepare_layers: Called on the plain Decoder before adapters are added (activation
            checkpointing, torch.compile of the blocks).
        shard: Shards the model in place (FSDP2's ``fully_shard``); None keeps it whole.
        adapter: A resumed run's adapter (``tune_ckpt.Adapter``); None starts new adapters.
        adapter_source: Where ``adapter`` was read, for messages.

    Returns:
        The model; only its adapters require grad.

    Raises:
        RecipeError: ``adapter`` was made with other settings or for another model.
    """
    from tune_models import Decoder, apply_lora, init_lora_, is_lora_key, quantize_base
    from tune_models.nf4 import NF4_PARAMETERS, is_quantized, quantize_nf4

    if quantize is not None and device.type == "cpu":
        return_large_blocks_to_os()
    with torch.device("meta"):
        model = Decoder(config)
    model.to(dtype=dtype)
    prepare_layers(model)
    weights = read_weights(base, model) if base is not None else RandomBase(model, seed, device)
    apply_lora(model, rank=settings.rank, alpha=settings.alpha, dropout=settings.dropout,
               targets=settings.targets)
    if quantize is not None:
        quantize_base(model, quantize, device="meta")
    if adapter is not None:
        _check_adapter(model, adapter, settings, adapter_source)
    if shard is not None:
        shard(model)
        model.to_empty(device=device)

    def put(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
        param = module._parameters[name]
        if shard is None:  # the value becomes the parameter: no copy when it needs no cast
            module._parameters[name] = torch.nn.Parameter(
                value.to(device=device, dtype=param.dtype), requires_grad=param.requires_grad)
        else:
            _copy_shard(param, value)

    with torch.no_grad():
        for path, module in model.named_modules():
            if is_quantized(module):
                q = quantize_nf4(weights[f"{path}.weight"].to(device))
                for name, value in zip(NF4_PARAMETERS, q):
                    put(module, name, value)
        torch.manual_seed(seed)
        for key, param in list(model.named_parameters()):
            path, _, name = key.rpartition(".")
            if name in NF4_PARAMETERS:
                continue
            module = model.get_submodule(path)
            if not is_lora_key(key):
                put(module, name, weights[key])
            elif adapter is not None:
                put(module, name, adapter.weights[key])
            else:  # whole, in the order one process makes them: the same numbers everywhere
                put(module, name, init_lora_(
                    torch.empty(param.shape, dtype=param.dtype, device=device), key))
    return model


def _copy_shard(param: torch.nn.Parameter, whole: torch.Tensor) -> None:
    """Copy this process's part of ``whole`` into a parameter FSDP2 has sharded."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):  # a module left unsharded
        param.copy_(whole)
        return
    (placement,) = param.placements  # FSDP2 over one mesh dimension: Shard(0)
    mesh = param.device_mesh
    chunks = torch.chunk(whole, mesh.size(), dim=placement.dim)  # as FSDP2 splits
    rank = mesh.get_local_rank()
    part = chunks[rank] if rank < len(chunks) else whole.narrow(placement.dim, 0, 0)
    local = param.to_local()
    if part.shape != local.shape:
        raise RuntimeError(f"shard of shape {tuple(local.shape)} cannot take "
                           f"{tuple(part.shape)} of {tuple(whole.shape)}")
    local.copy_(part)


def _check_adapter(model: torch.nn.Module, adapter, settings, where: Path | None) -> None:
    from tune_models import check_lora_state_dict

    if adapter.settings != settings:
        raise RecipeError(
            f"{where} holds an adapter with rank {adapter.settings.rank}, alpha "
            f"{adapter.settings.alpha:g}, targets {','.join(adapter.settings.targets)}; this "
            f"run's are rank {settings.rank}, alpha {settings.alpha:g}, targets "
            f"{','.join(settings.targets)}: resume with the settings it was trained with")
    try:
        check_lora_state_dict(model, adapter.weights)
    except ValueError as e:
        raise RecipeError(f"{where}: {e}") from e


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
