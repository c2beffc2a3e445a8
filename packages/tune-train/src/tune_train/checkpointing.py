"""Checkpoints that a kill at any moment cannot corrupt, read back as untrusted input.

Layout under ``<output_dir>/checkpoints``::

    step_0000120/
        native_pytorch_model.pt   the model, native key schema (tune generate, tune-ckpt read it);
                                  native_pytorch_model.safetensors with checkpoint_format:
                                  safetensors; a LoRA run writes its adapter instead
                                  (adapter_config.json, adapter_model.safetensors,
                                  tune_adapter.json)
        tune_model.json           the model's shape (DecoderConfig fields) and family
        training_state/           optimizer state, torch.distributed.checkpoint (resharding: a
                                  run can resume on a different number of processes)
        trainer_state.json        the recipe, step, epoch, position in the epoch, loss scale
                                  (tune_train.state.TrainingState)
        rng_state.pt              torch RNG states (tensors only)
    best/                         with save_best: the model of the lowest validation loss
        native_pytorch_model.pt   (or .safetensors), tune_model.json: what a step folder has
        best.json                 for generate, eval and convert; its step and val_loss

One way to publish, for step folders and ``best`` alike (:func:`staging`): the folder is
assembled in ``.tmp-<name>``, every file fsynced, and renamed into place. A folder of that
name already there (a step saved twice, the previous best) is first renamed to
``.old-<name>`` and deleted once the new one is in place. A kill at any moment leaves the old
folder or the new one under the name, or ``.old-<name>`` alone, which the next start puts
back (:func:`remove_partial_checkpoints`); so the newest ``step_*`` folder is always
complete, and a failed save removes its staging folder. ``best`` is never pruned and never
resumed from.

Links: every file is written into a staging folder the run has just created, so nothing is
written through a link planted beside the checkpoints. ``checkpoints`` itself may be a link
to a folder on another disk if it is yours (it is followed); a link there that belongs to
another user is refused (:func:`checkpoint_root_problem`).

A checkpoint folder may come from a shared drive or a download, so nothing in it is unpickled
freely: weights and RNG states load with ``weights_only=True`` (or safetensors), the DCP
metadata with an unpickler that admits only the classes DCP metadata is made of, and
trainer_state.json is checked field by field. Anything missing, truncated, corrupt or foreign
raises :class:`DamagedCheckpointError` naming the file.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tune_ckpt import CheckpointError
from tune_ckpt.names import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILES,
    ADAPTER_SIDECAR_FILE,
    MODEL_ARGS_FILE,
    NATIVE_FILE,
    NATIVE_FILES,
    NATIVE_SAFETENSORS_FILE,
)
from tune_train.errors import RecipeError
from tune_train.state import TRAINER_STATE, DamagedCheckpointError, TrainingState, step_of

# The model file of a checkpoint, by the config's checkpoint_format.
MODEL_FILES = {"pt": NATIVE_FILE, "safetensors": NATIVE_SAFETENSORS_FILE}
RNG_STATE = "rng_state.pt"
TRAINING_STATE = "training_state"
DCP_METADATA = ".metadata"  # the name torch.distributed.checkpoint gives its metadata file
_STEP_DIR = re.compile(r"^step_(\d+)$")
BEST_DIR = "best"
BEST_INFO = "best.json"
_STAGING, _OLD = ".tmp-", ".old-"

__all__ = ["BEST_DIR", "BEST_INFO", "DCP_METADATA", "MODEL_FILES", "RNG_STATE", "TRAINER_STATE",
           "TRAINING_STATE", "DamagedCheckpointError", "TrainingState", "checkpoint_root",
           "latest_checkpoint", "list_checkpoints", "read_best_info", "recipe_of",
           "remove_partial_checkpoints", "resume_point", "save_best", "save_checkpoint",
           "staging"]


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / TRAINER_STATE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def checkpoint_root_problem(output_dir: str | Path) -> str | None:
    """Why a run must not write under ``output_dir/checkpoints``, or None.

    A link there is followed if it belongs to this user (checkpoints kept on another disk);
    one that belongs to someone else (planted in a shared /tmp) is refused, as is a
    ``checkpoints`` that is not a folder.
    """
    root = checkpoint_root(output_dir)
    try:
        info = root.lstat()
    except FileNotFoundError:
        return None
    if root.is_symlink() and info.st_uid != os.geteuid():
        return (f"{root} is a symbolic link (to {os.readlink(root)}) that another user made; "
                "tune only writes checkpoints through a link you own: remove it, or set "
                "another output_dir")
    if root.exists() and not root.is_dir():
        return (f"{root} is not a folder; tune keeps its checkpoints there: move it away, or "
                "set another output_dir")
    return None


def _remove(path: Path) -> None:
    """Delete a file, a link (not what it points at) or a folder tree."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def remove_partial_checkpoints(output_dir: str | Path) -> None:
    """Delete what a kill in the middle of a save left behind, and put back a checkpoint a
    kill caught between the two renames of its replacement."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.name.startswith(_STAGING):
            _remove(path)
        elif path.name.startswith(_OLD):
            _repair(path, root / path.name[len(_OLD):])


def _repair(old: Path, final: Path) -> None:
    if final.exists() or final.is_symlink() or old.is_symlink():
        _remove(old)  # the replacement finished (or the leftover is not ours)
    else:
        old.rename(final)  # a kill between the two renames: put it back


def _written_by_training() -> set[str]:
    return {*NATIVE_FILES, MODEL_ARGS_FILE, TRAINER_STATE, RNG_STATE, TRAINING_STATE,
            ADAPTER_CONFIG_FILE, *ADAPTER_FILES, ADAPTER_SIDECAR_FILE, BEST_INFO}


def prune_checkpoints(output_dir: str | Path, keep: int) -> list[tuple[Path, str]]:
    """Delete all but the newest ``keep`` checkpoints (renamed away first: never half-gone).

    A checkpoint that holds something training did not write (the ``hf_model`` folder
    ``tune convert_checkpoint --to hf`` puts beside a model file by default) is left whole.

    Returns:
        (checkpoint, the first foreign entry) for each checkpoint left for that reason.
    """
    ours, kept = _written_by_training(), []
    for old in list_checkpoints(output_dir)[:-keep]:
        foreign = sorted(p.name for p in old.iterdir() if p.name not in ours)
        if foreign:
            kept.append((old, foreign[0]))
            continue
        doomed = old.with_name(f"{_STAGING}delete-{old.name}")
        old.rename(doomed)
        _remove(doomed)
    return kept


def _fsync_tree(path: Path) -> None:
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def staging(output_dir: str | Path, name: str, is_main: bool = True) -> Iterator[Path]:
    """Yield a new, empty folder to write checkpoint ``name`` into; publish it on success.

    The one publish protocol of every checkpoint folder (see the module docstring). Under
    torchrun every rank may write into the staging folder, but only the main rank creates,
    publishes or removes it: the caller barriers after creating and before leaving. If
    writing fails, the main rank removes the staging folder and the folder of that name (if
    any) stays as it was.
    """
    root = checkpoint_root(output_dir)
    final, tmp, old = root / name, root / f"{_STAGING}{name}", root / f"{_OLD}{name}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if old.exists() or old.is_symlink():
            _repair(old, final)
        _remove(tmp)
        tmp.mkdir()  # fails rather than reuses a folder someone else put there
    try:
        yield tmp
        if is_main:
            _fsync_tree(tmp)
            if final.exists() or final.is_symlink():
                final.rename(old)
            tmp.rename(final)
            _fsync_dir(root)
            _remove(old)
    except BaseException:
        if is_main:
            _remove(tmp)
        raise


def read_best_info(output_dir: str | Path) -> dict[str, Any] | None:
    """``{"step", "val_loss"}`` of ``checkpoints/best``, or None if there is no readable one
    (it is written by the run itself; a damaged one is simply replaced by the next best)."""
    path = checkpoint_root(output_dir) / BEST_DIR / BEST_INFO
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(info, dict):
        return None
    step, loss = info.get("step"), info.get("val_loss")
    if (isinstance(step, bool) or not isinstance(step, int) or step < 0
            or isinstance(loss, bool) or not isinstance(loss, (int, float))
            or not math.isfinite(loss)):
        return None
    return {"step": step, "val_loss": float(loss)}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def os_error_in(error: BaseException) -> OSError | None:
    """The OS error behind a failed write, if any: torch's writers wrap it (the zip writer in
    a RuntimeError, DCP in a CheckpointException), tune-ckpt in a CheckpointError."""
    from torch.distributed.checkpoint.api import CheckpointException

    seen: set[int] = set()
    todo: list[BaseException] = [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        if isinstance(e, CheckpointException):
            todo.extend(exc for exc, _ in e.failures.values())
        todo.extend([e.__cause__, e.__context__])
    return None


def failure_reason(error: BaseException) -> str:
    """Why a write failed, in the OS's words where it was the OS (with the fix for a full
    disk)."""
    import errno

    cause = os_error_in(error)
    if cause is None:
        return str(error)
    reason = os.strerror(cause.errno)
    if cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason += " (free some disk space)"
    return reason


def save_failed_message(checkpoint: Path, error: BaseException) -> str:
    """The line to show when saving ``checkpoint`` failed: the OS's reason and that the
    previous checkpoint (named) is still the one to resume from."""
    checkpoint = Path(checkpoint)
    reason = failure_reason(error)
    latest = latest_checkpoint(checkpoint.parent.parent)
    if latest is None:
        return f"could not save checkpoint {checkpoint}: {reason}; no checkpoint of this run " \
               "was saved yet"
    return (f"could not save checkpoint {checkpoint}: {reason}; {latest.name} is still the "
            "latest checkpoint (resume_from_checkpoint: True continues from it)")


def _failed_write(error: BaseException) -> bool:
    """Whether a save failed because a write did (full disk, ...), not because of a bug."""
    return not isinstance(error, RuntimeError) or os_error_in(error) is not None


# ---------------------------------------------------------------------------- saving
def save_checkpoint(output_dir: str | Path, state: TrainingState, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, write_model: Callable[[Path], None], *,
                    loss_scaler: Any = None, keep_last: int, is_main: bool = True,
                    barrier: Callable[[], None] = lambda: None,
                    warn: Callable[[str], None] = print) -> Path:
    """Write a step checkpoint: the model (``write_model``, on the main rank), the optimizer
    state (every rank its shards), the progress and RNG states; then prune old ones.

    Args:
        output_dir: The run's output folder.
        state: The run's progress (written as trainer_state.json).
        model: The model (sharded or not), whose parameter names key the optimizer state.
        optimizer: Its optimizer.
        write_model: Writes the model's files into a folder (called on the main rank):
            :func:`model_writer` for full weights, ``tune_train.lora.adapter_writer``.
        loss_scaler: fp16's ``DynamicLossScaler``, if any.
        keep_last: How many step checkpoints to keep.
        is_main: Whether this is the main rank.
        barrier: Waits for every rank (a no-op on one process).
        warn: Called with one line per old checkpoint kept because it holds a user's files.

    Returns:
        The checkpoint folder.

    Raises:
        RecipeError: If it cannot be written (e.g. the disk is full); the staging folder is
            removed and the previous checkpoint stays the latest.
    """
    final = checkpoint_root(output_dir) / f"step_{state.global_step:07d}"
    state.loss_scaler = loss_scaler.state_dict() if loss_scaler is not None else None
    try:
        with staging(output_dir, final.name, is_main) as tmp:
            barrier()  # the staging folder exists before anyone writes into it
            if is_main:
                write_model(tmp)
                torch.save(rng_state(), tmp / RNG_STATE)
            save_optimizer_state(tmp / TRAINING_STATE, model, optimizer)
            if is_main:
                state.write(tmp)
            barrier()  # every shard is on disk before rank 0 publishes
    except (OSError, RuntimeError, CheckpointError) as e:
        if not _failed_write(e):
            raise  # not a failed write: a bug worth its traceback
        raise RecipeError(save_failed_message(final, e)) from e
    if is_main:
        for kept, foreign in prune_checkpoints(output_dir, keep_last):
            warn(f"{kept} holds {foreign}, which training did not write: the checkpoint is "
                 f"kept whole past keep_last_n_checkpoints; move {foreign} elsewhere and "
                 "delete the folder when you are done")
    barrier()
    return final


def save_best(output_dir: str | Path, state: TrainingState, write_model: Callable[[Path], None],
              val_loss: float, *, is_main: bool = True) -> Path:
    """Replace ``checkpoints/best`` with the model as it is now, whose validation loss is
    ``val_loss``: the model files of a step folder and ``best.json`` (step, val_loss); the
    state records it as the best so far.

    Raises:
        RecipeError: If it cannot be written; the previous best stays as it was.
    """
    best = checkpoint_root(output_dir) / BEST_DIR
    try:
        with staging(output_dir, BEST_DIR, is_main) as tmp:
            if is_main:
                write_model(tmp)
                write_json(tmp / BEST_INFO, {"step": state.global_step, "val_loss": val_loss})
    except (OSError, RuntimeError, CheckpointError) as e:
        if not _failed_write(e):
            raise
        kept = (f"it still holds the model of step {state.best_val_step}"
                if state.best_val_step is not None else "there is none yet")
        raise RecipeError(f"could not save the best model to {best}: {failure_reason(e)}; "
                          f"{kept}") from e
    state.best_val_loss, state.best_val_step = val_loss, state.global_step
    return best


def model_writer(state_dict: dict[str, torch.Tensor], config: Any, family: str,
                 checkpoint_format: str) -> Callable[[Path], None]:
    """What writes a full model into a checkpoint folder: the weights and the model's shape
    (what tune generate, eval and convert read)."""
    from tune_ckpt import save_native, write_model_args

    def write(folder: Path) -> None:
        save_native(state_dict, folder / MODEL_FILES[checkpoint_format])
        # The family travels with the weights: tune generate --chat and a later fine-tune of
        # this checkpoint read it even where the run's config.yaml is not beside it.
        write_model_args(folder, config, family=family)

    return write


# ---------------------------------------------------------------------------- resuming
def recipe_of(checkpoint: Path) -> str | None:
    """The recipe that wrote a checkpoint: its trainer_state.json says, or (checkpoints of
    tune before it did) its files: an adapter is lora_finetune's, full weights
    full_finetune's. None if nothing tells (a damaged checkpoint)."""
    try:
        recipe = TrainingState.read(checkpoint).recipe
    except DamagedCheckpointError:
        recipe = None
    if recipe is not None:
        return recipe
    if (Path(checkpoint) / ADAPTER_CONFIG_FILE).is_file():
        return "lora_finetune"
    if any((Path(checkpoint) / name).is_file() for name in NATIVE_FILES):
        return "full_finetune"
    return None


def resume_point(output_dir: str | Path, recipe: str, resume: bool) -> Path | None:
    """The checkpoint a run continues from (the latest), or None to start afresh.

    Args:
        output_dir: The run's output folder.
        recipe: The recipe about to run.
        resume: The config's ``resume_from_checkpoint``.

    Raises:
        RecipeError: output_dir holds an earlier run's checkpoints and ``resume`` is off, or
            they are another recipe's (named, with the command that continues them; nothing
            is to be deleted).
    """
    latest = latest_checkpoint(output_dir)
    if latest is None and read_best_info(output_dir) is None:
        return None
    if not resume:
        raise RecipeError(f"{output_dir} already holds checkpoints of an earlier run; set "
                          "resume_from_checkpoint: True to continue it, or pick another "
                          "output_dir")
    if latest is None:
        return None
    written_by = recipe_of(latest)
    if written_by is not None and written_by != recipe:
        raise RecipeError(
            f"{latest} is a checkpoint of a {written_by} run, which {recipe} cannot continue; "
            f"resume it with the recipe that wrote it (tune run {written_by} --config ... "
            f"resume_from_checkpoint=True), or set another output_dir for this {recipe} run")
    return latest


def damaged_message(checkpoint: Path, error: Exception) -> str:
    """The line to show when ``checkpoint`` cannot be resumed from: what is wrong, and that
    deleting the folder resumes from the checkpoint before it (named) or from the start."""
    checkpoint = Path(checkpoint)
    output_dir = checkpoint.parent.parent
    earlier = [p for p in list_checkpoints(output_dir) if step_of(p) < step_of(checkpoint)]
    if earlier:
        advice = f"delete it to resume from {earlier[-1].name}, the checkpoint before it"
    else:
        advice = "delete it to start from the beginning (it is the only checkpoint)"
    return f"cannot resume from {checkpoint}: {error}; {advice}"


def check_checkpoint(checkpoint: Path) -> Path:
    """Check every file of a full checkpoint before anything heavy is built from it.

    Reads trainer_state.json, the model file's header (weights only), the DCP metadata (with
    the restricted unpickler) and the sizes of its shard files, and the RNG states.

    Returns:
        The checkpoint's model file.

    Raises:
        DamagedCheckpointError: Naming the first file that is missing, truncated, corrupt or
            not what tune writes.
    """
    from tune_ckpt import load_native

    checkpoint = Path(checkpoint)
    TrainingState.read(checkpoint)
    weights = model_file(checkpoint)
    try:
        load_native(weights)  # mmap'd: reads the pickle or header, not the weights
    except CheckpointError as e:
        raise DamagedCheckpointError(str(e)) from e
    read_dcp_metadata(checkpoint / TRAINING_STATE)
    load_rng_state(checkpoint)
    return weights


def model_file(checkpoint: Path) -> Path:
    """The native weights file of a checkpoint folder (either checkpoint_format).

    Raises:
        DamagedCheckpointError: If the folder holds none, or both.
    """
    from tune_ckpt import find_native_file

    try:
        return find_native_file(checkpoint)
    except CheckpointError as e:
        pt, safetensors = MODEL_FILES.values()
        if (Path(checkpoint) / pt).is_file():
            raise DamagedCheckpointError(f"it holds both {pt} and {safetensors}; tune writes "
                                         "one") from e
        raise DamagedCheckpointError(f"it holds no model weights (neither {pt} nor "
                                     f"{safetensors})") from e


def resume_weights(checkpoint: Path) -> Path:
    """The model file of a full checkpoint to resume from, once every file of the checkpoint
    has been checked.

    Raises:
        RecipeError: A file is missing or damaged (named, with the checkpoint to fall back to).
    """
    try:
        return check_checkpoint(checkpoint)
    except DamagedCheckpointError as e:
        raise RecipeError(damaged_message(checkpoint, e)) from e


def load_training_state(checkpoint: Path, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, state: TrainingState,
                        steps_per_epoch: int, loss_scaler: Any = None) -> TrainingState:
    """Continue a checkpoint: restore its optimizer state, RNG states and fp16 loss scale
    (the weights were loaded when the model was built).

    Args:
        checkpoint: The checkpoint folder.
        model: The model, whose parameter names key the optimizer state.
        optimizer: Its optimizer.
        state: This run's fresh state (recipe, processes, batch settings).
        steps_per_epoch: This run's optimizer steps per epoch.
        loss_scaler: fp16's loss scaler, if any.

    Returns:
        ``state`` continuing the checkpoint's progress (:meth:`TrainingState.resumed`).

    Raises:
        RecipeError: A file of the checkpoint is damaged (named, with the checkpoint to fall
            back to).
        CheckpointError: The optimizer state does not fit this run's model and optimizer.
    """
    try:
        saved = TrainingState.read(checkpoint)
        load_optimizer_state(checkpoint / TRAINING_STATE, model, optimizer)
        rng = load_rng_state(checkpoint)
    except DamagedCheckpointError as e:
        raise RecipeError(damaged_message(checkpoint, e)) from e
    set_rng_state(rng)
    if loss_scaler is not None and saved.loss_scaler:
        loss_scaler.load_state_dict(saved.loss_scaler)
    return state.resumed(saved, steps_per_epoch)


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def load_rng_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The RNG states saved in a checkpoint (weights-only load, checked).

    Raises:
        DamagedCheckpointError: If the file is missing, unsafe, corrupt or not RNG states.
    """
    from tune_ckpt import load_native

    path = Path(checkpoint) / RNG_STATE
    if not path.is_file():
        raise DamagedCheckpointError(f"{RNG_STATE} is missing")
    try:
        state = load_native(path)
    except CheckpointError as e:
        raise DamagedCheckpointError(str(e)) from e
    for key, tensor in state.items():
        if key not in ("cpu", "cuda") or tensor.dtype != torch.uint8 or tensor.dim() != 1:
            raise DamagedCheckpointError(f"{RNG_STATE} holds '{key}' ({tensor.dtype}, "
                                         f"{tuple(tensor.shape)}), not a torch RNG state")
    if "cpu" not in state:
        raise DamagedCheckpointError(f"{RNG_STATE} lacks the CPU RNG state")
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"].clone())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].clone())


# ---------------------------------------------------------------------------- optimizer (DCP)
def save_optimizer_state(path: Path, model: torch.nn.Module,
                         optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state keyed by parameter names, sharded as the parameters are (DCP).

    Raises:
        OSError: The write failed in the OS (full disk, file size limit, ...).
        CheckpointError: It failed otherwise.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    try:
        with warnings.catch_warnings():
            # One process is a supported case, not a mistake worth a warning on every save.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)},
                     checkpoint_id=path)
    except CheckpointException as e:  # a BaseException: `except Exception` would miss it
        cause = os_error_in(e)
        if cause is not None:
            raise cause from None
        raise CheckpointError(f"could not write the optimizer state to {path} "
                              f"({_first_failure(e)})") from None


def _first_failure(error: BaseException) -> str:
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


# What DCP metadata is made of (torch 2.5 to 2.15): its own dataclasses, torch.Size, dtypes,
# layouts, memory formats, paths. A test saves real DCP checkpoints and reads them back through
# this list, so a torch release that pickles something else fails that test loudly.
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                 "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
} | {(module, name) for module in ("pathlib", "pathlib._local")
     for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")}


class _Refused(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else: any other global is refused, not imported."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("a persistent id")


def read_dcp_metadata(folder: Path) -> Any:
    """The metadata of a DCP checkpoint folder, unpickled safely and checked against its files.

    Returns:
        A ``torch.distributed.checkpoint.metadata.Metadata``.

    Raises:
        DamagedCheckpointError: If it is missing, empty, truncated, asks for anything but
            metadata classes, or points at shard files that are missing or too short.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    folder = Path(folder)
    where = f"{folder.name}/{DCP_METADATA}"
    path = folder / DCP_METADATA
    if not path.is_file():
        raise DamagedCheckpointError(f"{where} is missing")
    if path.stat().st_size == 0:
        raise DamagedCheckpointError(f"{where} is empty (the save did not finish)")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except _Refused as e:
        raise DamagedCheckpointError(
            f"refusing to load {where}: it asks for {e}, which is not checkpoint metadata "
            "(unpickling it could run code)") from e
    except Exception as e:  # noqa: BLE001 - any failure to parse is a corrupt file
        raise DamagedCheckpointError(
            f"{where} is truncated or corrupt ({type(e).__name__}: {e})") from e
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise DamagedCheckpointError(f"{where} holds a {type(metadata).__name__}, not DCP "
                                     "metadata")
    sizes: dict[str, int] = {}
    for info in metadata.storage_data.values():
        name, offset, length = (getattr(info, k, None) for k in ("relative_path", "offset",
                                                                  "length"))
        if (not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..")
                or not all(isinstance(x, int) and x >= 0 for x in (offset, length))):
            raise DamagedCheckpointError(f"{where} is corrupt (a record points at "
                                         f"{name!r}, offset {offset!r}, length {length!r})")
        if name not in sizes:
            shard = folder / name
            if not shard.is_file():
                raise DamagedCheckpointError(f"{folder.name}/{name} is missing")
            sizes[name] = shard.stat().st_size
        if offset + length > sizes[name]:
            raise DamagedCheckpointError(
                f"{folder.name}/{name} is truncated (a record ends at byte {offset + length}, "
                f"the file has {sizes[name]})")
    return metadata


def _safe_reader(folder: Path):
    """A DCP FileSystemReader whose metadata comes from :func:`read_dcp_metadata`.

    Shard records are read by torch itself: tensors with ``torch.load(weights_only=True)``,
    other entries by our planner (also weights only). A record that fails to load is reported
    naming the shard files.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    metadata = read_dcp_metadata(folder)

    class SafeMetadataReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            # What FileSystemReader.read_metadata does after its own (unrestricted) unpickling.
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_data(self, plan, planner):
            try:
                return super().read_data(plan, planner)
            except Exception as e:  # noqa: BLE001 - named below, with the files involved
                files = sorted({self.storage_data[item.storage_index].relative_path
                                for item in plan.items})
                where = ", ".join(f"{folder.name}/{name}" for name in files)
                if isinstance(e, pickle.UnpicklingError):
                    raise DamagedCheckpointError(
                        f"refusing to load {where}: a record needs unpickling arbitrary Python "
                        "objects, which could run code") from e
                raise DamagedCheckpointError(
                    f"{where} is corrupt ({type(e).__name__}: "
                    f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") from e

    return SafeMetadataReader(folder)


def load_optimizer_state(path: Path, model: torch.nn.Module,
                         optimizer: torch.optim.Optimizer) -> None:
    """Load what save_optimizer_state wrote, resharded to this run's processes.

    Raises:
        DamagedCheckpointError: A file of the optimizer state is missing, truncated, corrupt
            or unsafe.
        CheckpointError: It does not fit this run's model and optimizer.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    class _WeightsOnlyPlanner(DefaultLoadPlanner):
        # The default planner unpickles non-tensor entries with weights_only=False; ours
        # (param_groups: numbers, tuples, names) load fine under weights_only=True.
        def load_bytes(self, read_item, value):
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict,
                            self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    # The run's config decides the hyperparameters (weight_decay, betas, momentum, ...): a user
    # who changes one before resuming gets the new value, not the checkpoint's. The lr is set
    # by the schedule at every step.
    configured = [{k: v for k, v in group.items() if k not in ("params", "lr")}
                  for group in optimizer.param_groups]
    reader = _safe_reader(Path(path))
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, planner=_WeightsOnlyPlanner())
    except CheckpointException as e:  # a BaseException: `except Exception` would miss it
        for failure, _ in e.failures.values():
            if isinstance(failure, CheckpointError):
                raise failure from None
        raise CheckpointError(
            f"the optimizer state in {path} does not fit this run ({_first_failure(e)}); "
            "resume with the model, optimizer and optimizer_args it was saved with") from None
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    for group, settings in zip(optimizer.param_groups, configured):
        group.update(settings)
