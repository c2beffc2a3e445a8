"""Finding and loading a trained or converted model for generation and evaluation."""

from __future__ import annotations

from pathlib import Path

import torch

from tune_ckpt import CheckpointError
from tune_train.errors import RecipeError


def resolve_checkpoint(path: str | Path) -> Path:
    """The weights file a user means by ``path``.

    Accepts a weights file, a checkpoint folder (every step folder the recipe writes, in
    either checkpoint_format), or a training output_dir (its latest checkpoint).

    Raises:
        RecipeError: If nothing loadable is there.
    """
    from tune_ckpt import find_native_file
    from tune_ckpt.names import NATIVE_FILES
    from tune_train.checkpointing import latest_checkpoint

    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        latest = latest_checkpoint(path)
        folder = latest if latest is not None else path
        try:
            return find_native_file(folder)
        except CheckpointError as e:
            if latest is not None:
                raise RecipeError(f"{latest}, the latest checkpoint in {path}: {e}") from e
            raise RecipeError(f"{path} holds no model weights ({' or '.join(NATIVE_FILES)}) "
                              "and no checkpoints; pass a checkpoint file or a training "
                              "output_dir") from e
    raise RecipeError(f"checkpoint {path} does not exist")


# Where a model's tokenizer lies beside its weights, in the order tried: the SentencePiece or
# tiktoken file a family ships as its own (Meta's Llama 3 one under original/ in a Hub
# download), then Hugging Face's tokenizer.json (every family's Hub repository has one), then
# a byte-level BPE's vocab.json (+ merges.txt), what a transformers re-save may hold instead.
TOKENIZER_FILES = ("tokenizer.model", "original/tokenizer.model", "tokenizer.json",
                   "vocab.json")


def resolve_tokenizer(checkpoint: Path, tokenizer: str | Path | None) -> Path:
    """The tokenizer file: as given, else beside the checkpoint, else the training run's.

    Beside the checkpoint means one of :data:`TOKENIZER_FILES` in its folder or, for a step
    folder of a training run, in the run's output_dir; else the ``tokenizer_checkpoint``
    the run's ``config.yaml`` names.

    Raises:
        RecipeError: If none is found.
    """
    if tokenizer is not None:
        return Path(tokenizer)
    for folder in _run_folders(checkpoint):
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                return folder / name
        named = _run_setting(folder, "tokenizer_checkpoint")
        if named and Path(named).is_file():  # a training run's output_dir names its tokenizer
            return Path(named)
    raise RecipeError(f"no tokenizer found for {checkpoint}; pass --tokenizer "
                      "path/to/tokenizer.model (or tokenizer.json)")


def resolve_chat_template(checkpoint: Path, chat_template: str | None) -> str | None:
    """The chat template to prompt a checkpoint with: as given, else the one its training
    run used (its output_dir's config.yaml), else None (the tokenizer's default)."""
    if chat_template is not None:
        return chat_template
    for folder in _run_folders(checkpoint):
        if (folder / "config.yaml").is_file():
            return _run_setting(folder, "chat_template")
    return None


def resolve_enable_thinking(checkpoint: Path, enable_thinking: bool | None) -> bool | None:
    """``enable_thinking`` to prompt a checkpoint with: as given, else the one its training
    run set (its output_dir's config.yaml), else None (the template's default)."""
    if enable_thinking is not None:
        return enable_thinking
    for folder in _run_folders(checkpoint):
        if (folder / "config.yaml").is_file():
            return _run_setting(folder, "enable_thinking")
    return None


def _run_folders(checkpoint: Path) -> tuple[Path, Path]:
    """The checkpoint's folder and the training output_dir above a step folder."""
    return checkpoint.parent, checkpoint.parent.parent.parent


def _run_setting(folder: Path, key: str):
    config = folder / "config.yaml"
    if not config.is_file():
        return None
    from tune_train.config import read_yaml

    return read_yaml(config).get(key)


def checkpoint_family(checkpoint: str | Path) -> str | None:
    """The family a native checkpoint's ``tune_model.json`` records, or None.

    Read on its own (not through the model arguments) so that a checkpoint of another family
    is named as such whatever else its file holds.

    Args:
        checkpoint: A weights file, or the folder holding it.
    """
    import json

    from tune_ckpt.names import MODEL_ARGS_FILE

    path = Path(checkpoint)
    sidecar = (path if path.is_dir() else path.parent) / MODEL_ARGS_FILE
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None  # absent or unreadable: reading the model arguments says which
    family = data.get("family") if isinstance(data, dict) else None
    return family if isinstance(family, str) else None


def model_family_of(weights: Path):
    """The ``tune_models.ModelFamily`` of a weights file, or None if nothing says.

    Its ``tune_model.json`` says first (:func:`checkpoint_family`); else, for a training
    run's checkpoint, the ``model`` preset in the run's config.yaml.
    """
    from tune_models import FAMILIES, MODELS, family_of

    name = checkpoint_family(weights)
    if name is not None:
        return FAMILIES.get(name)
    for folder in _run_folders(weights):
        model = _run_setting(folder, "model")
        if isinstance(model, str) and model in MODELS:
            return family_of(model)
    return None


def checkpoint_config(checkpoint: str | Path):
    """The shape of the model a checkpoint holds, as a ``tune_models.DecoderConfig``.

    From the ``tune_model.json`` beside it (or Meta's params.json / HF's config.json there);
    keys that are not config fields (such as ``family``) are left out.

    Raises:
        RecipeError: If no shape is found, or it is one the model refuses (e.g. an unknown
            rope_scaling type); the message names the file.
    """
    from tune_ckpt import read_model_args
    from tune_models import DecoderConfig

    try:
        args = read_model_args(checkpoint)
    except CheckpointError as e:
        raise RecipeError(str(e)) from e
    fields = DecoderConfig.__dataclass_fields__
    try:
        return DecoderConfig(**{k: v for k, v in args.items() if k in fields})
    except (TypeError, ValueError) as e:
        raise RecipeError(f"the model arguments beside {checkpoint} do not describe a model "
                          f"tune builds: {e}") from e


def check_weights(state: dict[str, torch.Tensor], config, path: Path) -> None:
    """Refuse weights that are not the model the shape file declares, or not finite.

    Names and shapes come from the file's header (tune_ckpt.check_model_fits), so a shape
    file declaring the wrong model is one line before memory is spent; the finiteness
    check reads the mapped weights once (generation and evaluation read them all anyway).

    Raises:
        RecipeError: Naming the file, the first tensor that does not fit, and why.
    """
    from tune_ckpt import check_finite, check_model_fits, model_args_file

    origin = model_args_file(path)
    try:
        check_model_fits(state, config, origin=str(origin or ""), where=str(path))
        check_finite(state, path)
    except CheckpointError as e:
        raise RecipeError(str(e)) from e


def load_model(checkpoint: str | Path, device: str | torch.device = "auto",
               dtype: torch.dtype | None = None, adapter: str | Path | None = None):
    """Build a decoder of the checkpoint's shape holding its weights (mmap, weights only).

    The shape, of any family, comes from the ``tune_model.json`` written beside every native
    checkpoint (or Meta's params.json / HF's config.json there): see
    :func:`checkpoint_config`. The weights are checked against it (names and shapes from the
    header first, then finiteness) before anything is built. With ``adapter`` (a PEFT LoRA
    adapter folder, or a lora_finetune output_dir) the adapter is merged into the base (a
    QLoRA one into its NF4 base) by the one builder (``tune_ckpt.building.inference_model``).

    Returns:
        (model in eval mode, its DecoderConfig).

    Raises:
        RecipeError: If the checkpoint or its shape cannot be found, or does not fit, or the
            adapter is missing, damaged or of another base model.
    """
    from tune_ckpt import load_native, load_peft_adapter
    from tune_ckpt.building import inference_model
    from tune_train.distributed import pick_device
    from tune_train.lora import resolve_adapter

    path = resolve_checkpoint(checkpoint)
    config = checkpoint_config(path)
    try:
        state = load_native(path)
    except CheckpointError as e:
        raise RecipeError(str(e)) from e
    check_weights(state, config, path)  # before anything is built or allocated
    found = None
    if adapter is not None:
        folder = resolve_adapter(adapter)
        try:
            found = load_peft_adapter(folder, config)
        except CheckpointError as e:
            raise RecipeError(str(e)) from e
    try:
        model = inference_model(config, state, found,
                                adapter_source=folder if adapter is not None else None)
    except CheckpointError as e:
        raise RecipeError(str(e)) from e
    device = pick_device(device) if isinstance(device, str) else device
    model = model.to(device=device, dtype=dtype) if dtype else model.to(device=device)
    return model.eval(), config
