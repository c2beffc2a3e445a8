"""Reading tensor files: weights only, mmap'd, never a copy of the model in memory.

torch files go through ``torch.load(weights_only=True)`` (mmap'd when the file is a zip
archive), safetensors files through their JSON header and a read-only mapping: nothing can
unpickle arbitrary objects, and truncated or corrupt files are refused with one clear line.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from tune_ckpt.errors import CheckpointError
from tune_ckpt.names import HF_CONFIG_FILE, HF_SAFETENSORS_FILE, MODEL_ARGS_FILE, NATIVE_FILES
from tune_ckpt.plan import DictSource, FileRange, TensorSource
from tune_models import dtype_of

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``, ``"float16"``, ``torch.float32``... -> a torch dtype (None stays None).

    The names are tune-models' one table (``tune_models.DTYPES``, torch's spellings too).

    Raises:
        CheckpointError: For a name that is not a floating-point dtype tune-ckpt writes.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype  # from Python: taken as given
    try:
        return dtype_of(dtype)
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the spelling config.json uses)."""
    return str(dtype).removeprefix("torch.")


def _sniff(path: Path) -> str:
    """'zip' (torch.save), 'safetensors', 'pickle' (legacy torch.save), 'empty' or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def _check_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict (a dict of tensors)"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        nested = [k for k in bad if isinstance(obj.get(k), dict)]
        hint = (
            f" (it looks like a training state with sections {sorted(map(str, obj))[:6]}; "
            "pass the model weights file instead)"
            if nested
            else ""
        )
        raise CheckpointError(
            f"{path} is not a plain state dict of tensors: entry '{bad[0]}' is a "
            f"{type(obj[bad[0]]).__name__}{hint}"
        )
    return obj


def read_torch_file(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Load a torch.save'd state dict with ``weights_only=True``, mmap'd when possible.

    Returns:
        The state dict and whether its tensors are views of a file mapping.

    Raises:
        CheckpointError: Missing, empty, truncated or corrupt file; a pickle that needs
            arbitrary Python objects; anything but a dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    kind = _sniff(path)
    if kind == "empty":
        raise CheckpointError(f"{path} is empty: the download or save did not finish")
    if kind == "safetensors":
        return read_safetensors(path), True
    if kind not in ("zip", "pickle"):
        raise CheckpointError(f"{path} is not a PyTorch or safetensors checkpoint (unknown format)")
    try:
        obj = torch.load(path, map_location="cpu", mmap=kind == "zip", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"unsupported GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)", str(e))
        what = f" ({next(g for g in found.groups() if g)})" if found else ""
        raise CheckpointError(
            f"refusing to load {path}: it needs unpickling arbitrary Python objects{what}, "
            "which could run code. Only plain tensor checkpoints and safetensors are loaded"
        ) from e
    except (RuntimeError, EOFError, KeyError, ValueError, IndexError, struct.error) as e:
        reason = "truncated or corrupt" if kind == "zip" else "corrupt or not a checkpoint"
        raise CheckpointError(
            f"{path} is {reason} ({str(e).splitlines()[0][:120]}); fetch or save it again"
        ) from e
    return _check_state_dict(obj, path), kind == "zip"


def read_safetensors_header(path: Path) -> tuple[dict, dict, int]:
    """Parse a safetensors header: (tensor entries, __metadata__, offset where data starts)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated: no safetensors header; fetch it again")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file (header of {n} bytes in a "
                f"{size}-byte file); fetch it again"
            )
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, 8 + n


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Map a safetensors file read-only; each tensor is a view of the mapping (no copy)."""
    path = Path(path)
    header, _, start = read_safetensors_header(path)
    size = path.stat().st_size
    entries = {}
    for key, info in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: unsupported or corrupt entry for '{key}' ({e})") from e
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{path}: entry '{key}' has bad offsets; the file is corrupt")
        if start + end > size:
            raise CheckpointError(
                f"{path} is truncated: '{key}' ends at byte {start + end} but the file has "
                f"{size}; fetch it again"
            )
        entries[key] = (dtype, shape, begin, end)
    # Two tensors sharing bytes would be one tensor read twice (and a write through one
    # would change the other): the safetensors format lays them end to end, never overlapping.
    spans = sorted((begin, end, key) for key, (_, _, begin, end) in entries.items() if end > begin)
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise CheckpointError(
                f"{path}: '{a}' and '{b}' claim the same bytes (overlapping data offsets); the "
                "file is corrupt or was crafted: fetch or save it again"
            )
    if not entries:
        return {}
    storage = torch.UntypedStorage.from_file(str(path), False, size)  # MAP_PRIVATE, read lazily
    out = {}
    for key, (dtype, shape, begin, end) in entries.items():
        out[key] = torch.empty(0, dtype=dtype).set_(storage[start + begin : start + end], 0, shape)
    return out


def file_ranges(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, FileRange]:
    """Where each contiguous tensor of a freshly mapped ``path`` lies in the file.

    Found through /proc/self/maps (Linux): the mapping of this file's inode that holds the
    tensor gives its file offset. Only call it on tensors nobody has written to: a private
    mapping keeps writes in memory, and the file would then hold stale bytes.
    """
    try:
        st = os.stat(path)
        with open("/proc/self/maps") as f:
            lines = [line.split(maxsplit=5) for line in f]
    except OSError:
        return {}
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    maps = []
    for fields in lines:
        if len(fields) >= 5 and fields[4] == str(st.st_ino) and fields[3] == device:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            maps.append((start, end, int(fields[2], 16)))
    crcs = _zip_record_crcs(path) if maps else {}
    out = {}
    for key, tensor in tensors.items():
        if not tensor.is_contiguous() or tensor.device.type != "cpu":
            continue
        ptr, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        for start, end, offset in maps:
            if start <= ptr and ptr + size <= end:
                where = offset + ptr - start
                out[key] = FileRange(str(path), where, size, crcs.get((where, size)))
                break
    return out


def _zip_record_crcs(path: Path) -> dict[tuple[int, int], int]:
    """(data offset, size) -> CRC-32 of each record of a torch zip archive (else empty).

    A tensor copied whole keeps its bytes, so its record's CRC carries over to the output
    without reading the data; a source whose stored CRC is wrong passes that on, visibly.
    """
    if _sniff(path) != "zip":
        return {}
    out = {}
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED or info.CRC == 0:
                continue  # torch can save without CRCs (zero): those are computed instead
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            out[(info.header_offset + 30 + name_len + extra_len, info.file_size)] = info.CRC
    return out


def read_tensor_file(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Any supported tensor file (torch zip, legacy torch pickle, safetensors), weights only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if _sniff(path) == "safetensors":
        return read_safetensors(path), True
    return read_torch_file(path)


def check_finite(tensors: Mapping[str, torch.Tensor], where: str | os.PathLike,
                 fix: str = "the file is damaged or its training diverged; use another "
                            "checkpoint") -> None:
    """Raise naming the first floating-point tensor that holds a NaN or an infinity.

    One sum per tensor: NaN and infinity survive a sum, so a finite sum clears a tensor at
    the cost of reading it once (a few GB/s, no copy). Only a tensor whose sum is not finite
    is scanned element by element, which tells a real NaN from a sum that overflowed.

    Args:
        tensors: Name -> tensor (views of a mapped file are fine: only read).
        where: The file they came from, for the message.
        fix: What the message tells the user to do.

    Raises:
        CheckpointError: ``<where>: '<name>' holds N non-finite values (NaN or infinity) ...``.
    """
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        if torch.isfinite(tensor.sum()):
            continue
        flat = tensor.detach().reshape(-1)
        bad = sum(int((~torch.isfinite(flat[i:i + _CHUNK])).sum())
                  for i in range(0, flat.numel(), _CHUNK))
        if bad:
            raise CheckpointError(
                f"{where}: '{name}' holds {bad:,} non-finite value{'s' if bad > 1 else ''} "
                f"(NaN or infinity) of {flat.numel():,}: {fix}"
            )


_CHUNK = 1 << 24  # elements scanned at a time: bounds the mask's memory


def find_native_file(folder: Path) -> Path:
    """The native checkpoint in a folder: native_pytorch_model.pt or .safetensors.

    A folder that tune's training recipe wrote with ``checkpoint_format: safetensors`` before
    it used the native name holds ``model.safetensors`` beside ``tune_model.json`` and no
    ``config.json``; that file is the native checkpoint too.

    Raises:
        CheckpointError: If the folder holds neither, or both.
    """
    folder = Path(folder)
    found = [folder / name for name in NATIVE_FILES if (folder / name).is_file()]
    if not found and is_legacy_native_folder(folder):
        found = [folder / HF_SAFETENSORS_FILE]
    if len(found) != 1:
        names = " or ".join(NATIVE_FILES)
        what = "both" if found else "neither"
        raise CheckpointError(f"{folder} has {what} of {names}: pass the checkpoint file itself")
    return found[0]


def is_legacy_native_folder(folder: Path) -> bool:
    """A recipe checkpoint whose native weights are named model.safetensors (older tune)."""
    folder = Path(folder)
    return ((folder / HF_SAFETENSORS_FILE).is_file() and (folder / MODEL_ARGS_FILE).is_file()
            and not (folder / HF_CONFIG_FILE).is_file())


def load_native(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a native checkpoint without copying it into memory.

    Args:
        path: A ``.pt`` (torch.save format) or ``.safetensors`` file, or a folder holding
            ``native_pytorch_model.pt`` / ``.safetensors`` (see :func:`find_native_file`).

    Returns:
        The state dict; tensors are views of a read-only file mapping, so pass it to
        ``load_state_dict(..., assign=True)`` on a meta-device model to use no extra memory.

    Raises:
        CheckpointError: If the file is missing, truncated, corrupt, or not a dict of tensors.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = find_native_file(path)
    return read_tensor_file(path)[0]


def open_tensor_files(files: list[Path]) -> TensorSource:
    """The tensors of one or more files (an HF checkpoint's shards) as one lazy source.

    Files are mapped, never read whole; where a tensor lies in its file is recorded so that a
    writer can copy its bytes file to file.

    Raises:
        CheckpointError: If a file is bad, or two files hold the same key.
    """
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    mapped: set[str] = set()
    ranges: dict[str, FileRange] = {}
    for file in files:
        sd, is_mapped = read_tensor_file(file)
        for key, tensor in sd.items():
            if key in tensors:
                raise CheckpointError(f"'{key}' is in both {where[key]} and {file}")
            tensors[key], where[key] = tensor, str(file)
            if is_mapped:
                mapped.add(key)
        if is_mapped:  # just mapped, never written: the file holds exactly these bytes
            ranges.update(file_ranges(sd, file))
    return DictSource(tensors, where, mapped, ranges)
