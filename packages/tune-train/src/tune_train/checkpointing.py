"""Checkpoints that a kill at any moment cannot corrupt, read back as untrusted input.

Layout under ``<output_dir>/checkpoints``::

    step_0000120/
        native_pytorch_model.pt   the model, native key schema (tune generate, tune-ckpt read it);
                                  native_pytorch_model.safetensors with checkpoint_format:
                                  safetensors
        tune_model.json           the model's shape (Llama2Config fields)
        training_state/           optimizer state, torch.distributed.checkpoint (resharding: a
                                  run can resume on a different number of processes)
        trainer_state.json        step, epoch, position in the epoch, loss scale
        rng_state.pt              torch RNG states (tensors only)
    best/                         with save_best: the model of the lowest validation loss
        native_pytorch_model.pt   (or .safetensors), tune_model.json: what a step folder has
        best.json                 for generate, eval and convert; its step and val_loss

A checkpoint is assembled in ``.tmp-step_0000120`` and renamed into place once every file is
written and fsynced, so the newest ``step_*`` folder is always complete; a failed save removes
its staging folder, and leftovers of a kill are removed on the next start. ``best`` is
assembled in ``.tmp-best`` and swapped in by two renames (the old one becomes ``.old-best``
for a moment); a kill between them leaves ``.old-best``, which the next start puts back.
``best`` is never pruned and never resumed from.

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
from collections.abc import Iterator
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

# The model file of a checkpoint, by the config's checkpoint_format.
MODEL_FILES = {"pt": NATIVE_FILE, "safetensors": NATIVE_SAFETENSORS_FILE}
TRAINER_STATE = "trainer_state.json"
RNG_STATE = "rng_state.pt"
TRAINING_STATE = "training_state"
DCP_METADATA = ".metadata"  # the name torch.distributed.checkpoint gives its metadata file
_STEP_DIR = re.compile(r"^step_(\d+)$")
BEST_DIR = "best"
BEST_INFO = "best.json"
_OLD_BEST = ".old-best"


class DamagedCheckpointError(CheckpointError):
    """A file of a checkpoint is missing, truncated, corrupt, or holds what tune never writes.

    The message names the file (relative to the checkpoint folder where that is clear).
    """


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


def remove_partial_checkpoints(output_dir: str | Path) -> None:
    """Delete what a kill in the middle of a save left behind (and put back a best
    checkpoint a kill caught between the two renames of its replacement)."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        _repair_best(root)


def _repair_best(root: Path) -> None:
    old = root / _OLD_BEST
    if old.is_dir():
        if (root / BEST_DIR).exists():
            shutil.rmtree(old, ignore_errors=True)  # the replacement finished
        else:
            old.rename(root / BEST_DIR)  # a kill between the two renames: put it back


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
        doomed = old.with_name(f".tmp-delete-{old.name}")
        old.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return kept


def _fsync_tree(path: Path) -> None:
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
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
def staging_dir(output_dir: str | Path, step: int, is_main: bool = True) -> Iterator[Path]:
    """Yield a temporary folder to write a checkpoint into; publish it on success.

    Every rank writes its shards into the same staging folder; only the main rank publishes
    (the caller must barrier between writing and leaving this context). If writing fails, the
    main rank removes the staging folder, so the newest complete checkpoint stays the latest.
    """
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-{final.name}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    try:
        yield tmp
        if is_main:
            _fsync_tree(tmp)
            if final.exists():  # re-saving a step (e.g. epoch end right after save_every)
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync_dir(root)
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def staging_best(output_dir: str | Path, is_main: bool = True) -> Iterator[Path]:
    """Yield a temporary folder to write the best model into; on success it replaces
    ``checkpoints/best``. Only the main rank writes (the weights are gathered there).

    The replacement is two renames: ``best`` -> ``.old-best``, the new folder -> ``best``;
    :func:`remove_partial_checkpoints` repairs a kill between them. A failure removes the
    temporary folder and leaves the previous best as it was.
    """
    root = checkpoint_root(output_dir)
    tmp, best, old = root / f".tmp-{BEST_DIR}", root / BEST_DIR, root / _OLD_BEST
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        _repair_best(root)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    try:
        yield tmp
        if is_main:
            _fsync_tree(tmp)
            if best.exists():
                best.rename(old)
            tmp.rename(best)
            _fsync_dir(root)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
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


# ---------------------------------------------------------------------------- reading back
def damaged_message(checkpoint: Path, error: Exception) -> str:
    """The line to show when ``checkpoint`` cannot be resumed from: what is wrong, and that
    deleting the folder resumes from the checkpoint before it (named) or from the start."""
    checkpoint = Path(checkpoint)
    output_dir = checkpoint.parent.parent
    earlier = [p for p in list_checkpoints(output_dir) if _step(p) < _step(checkpoint)]
    if earlier:
        advice = f"delete it to resume from {earlier[-1].name}, the checkpoint before it"
    else:
        advice = "delete it to start from the beginning (it is the only checkpoint)"
    return f"cannot resume from {checkpoint}: {error}; {advice}"


def _step(checkpoint: Path) -> int:
    m = _STEP_DIR.match(checkpoint.name)
    return int(m.group(1)) if m else -1


def check_checkpoint(checkpoint: Path) -> Path:
    """Check every file of a checkpoint before anything heavy is built from it.

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
    read_trainer_state(checkpoint)
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


# trainer_state.json: field -> smallest valid value (all whole numbers).
_STATE_FIELDS = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "world_size": 1,
                 "batch_size": 1, "gradient_accumulation_steps": 1}


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint, every field checked for type and range.

    Raises:
        DamagedCheckpointError: If it is missing, not JSON, or a field is missing or wrong.
    """
    path = Path(checkpoint) / TRAINER_STATE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise DamagedCheckpointError(f"{TRAINER_STATE} is missing") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedCheckpointError(f"{TRAINER_STATE} is not valid JSON ({e})") from e
    if not isinstance(state, dict):
        raise DamagedCheckpointError(f"{TRAINER_STATE} holds a {type(state).__name__}, not an "
                                     "object of training progress")
    for field, least in _STATE_FIELDS.items():
        if field not in state:
            raise DamagedCheckpointError(f"{TRAINER_STATE} lacks '{field}'")
        value = state[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise DamagedCheckpointError(f"{TRAINER_STATE}: '{field}' is {value!r}, expected a "
                                         f"whole number >= {least}")
    step = _step(Path(checkpoint))
    if step >= 0 and state["global_step"] != step:
        raise DamagedCheckpointError(f"{TRAINER_STATE}: 'global_step' is {state['global_step']} "
                                     f"but the folder is {Path(checkpoint).name}")
    if state["step_in_epoch"] > state["global_step"]:
        raise DamagedCheckpointError(f"{TRAINER_STATE}: 'step_in_epoch' "
                                     f"({state['step_in_epoch']}) exceeds 'global_step' "
                                     f"({state['global_step']})")
    _check_best_fields(state)
    scaler = state.get("loss_scaler")
    if scaler is not None:
        scale = scaler.get("scale") if isinstance(scaler, dict) else None
        good = scaler.get("good_steps") if isinstance(scaler, dict) else None
        if (isinstance(scale, bool) or not isinstance(scale, (int, float))
                or not math.isfinite(scale) or scale <= 0
                or isinstance(good, bool) or not isinstance(good, int) or good < 0):
            raise DamagedCheckpointError(f"{TRAINER_STATE}: 'loss_scaler' is {scaler!r}, "
                                         "expected null or {'scale': a positive number, "
                                         "'good_steps': a whole number >= 0}")
    return state


def _check_best_fields(state: dict[str, Any]) -> None:
    # Absent in checkpoints written before validation existed; then there is no best yet.
    # The step may lie past global_step: a run resumed after a kill keeps the best that the
    # killed run saved after the checkpoint it resumed from.
    step, loss = state.get("best_val_step"), state.get("best_val_loss")
    if step is None and loss is None:
        return
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise DamagedCheckpointError(f"{TRAINER_STATE}: 'best_val_step' is {step!r}, expected "
                                     "null or a whole number >= 0")
    if (isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss)
            or loss < 0):
        raise DamagedCheckpointError(f"{TRAINER_STATE}: 'best_val_loss' is {loss!r}, expected "
                                     "a finite number >= 0 beside 'best_val_step'")


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
