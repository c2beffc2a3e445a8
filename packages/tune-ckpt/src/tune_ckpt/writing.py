"""Writing tensor files: streaming, atomic, and copying unchanged bytes in the kernel.

Every file is written to a temporary name beside the target, fsync'd, then renamed, so a crash
or a full disk never leaves a half-written file under the real name; outputs of several files
(Hugging Face and Meta folders) are assembled in a temporary folder that is renamed into place.
Temporaries a killed run left are removed when the same output is written again.

The ``.pt`` writer produces the archive ``torch.save`` would (a stored ZIP with 64-byte aligned
records, loadable with ``torch.load(mmap=True, weights_only=True)``), but it writes the pickle
first from shapes alone and then each tensor as it comes. ``torch.save`` needs the whole state
dict in memory at once; this needs one tensor, and none at all for tensors whose bytes are
copied file to file.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import io
import json
import mmap
import os
import pickle
import re
import secrets
import shutil
import struct
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a concurrent write is not detected there
    fcntl = None

import torch

from tune_ckpt.errors import CheckpointError
from tune_ckpt.plan import DictSource, FileRange, TensorPlan
from tune_ckpt.reading import _SAFETENSORS_NAMES


def _write_all(fd: int, data: memoryview | bytes) -> None:
    # Index, do not keep slices in locals: a traceback would pin them, and an mmap with
    # live views cannot be closed.
    with memoryview(data) as view, view.cast("B") as flat:
        done = 0
        while done < flat.nbytes:
            done += os.write(fd, flat[done:])


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.numel() == 0:
        return memoryview(b"")
    # A uint8 view shares the tensor's memory: no copy between the tensor and the write.
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _disk_error(e: OSError, path: Path) -> CheckpointError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return CheckpointError(
            f"could not write {path}: {os.strerror(e.errno)}; free some disk space or choose "
            "another output location (nothing was overwritten)"
        )
    return CheckpointError(f"could not write {path}: {e.strerror or e}")


def _temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")


def remove_stale_temps(target: Path) -> None:
    """Delete what a killed write of ``target`` left beside it (temporary files or folders).

    They carry the target's name and a random part (see :func:`atomic_write` and
    :func:`staged_folder`), so only leftovers of this very output are touched. A writer holds
    a lock on its temporary for as long as it lives (the kernel drops it when the process
    ends, however it ends), so a temporary that is still locked belongs to a live write.

    Raises:
        CheckpointError: If another process is writing ``target`` right now.
    """
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.[0-9a-f]{{8}}\.tmp$")
    if not target.parent.is_dir():
        return
    for p in target.parent.iterdir():
        if not pattern.match(p.name):
            continue
        if _in_use(p):
            raise CheckpointError(
                f"another tune command (a merge or a conversion) is writing {target} right now "
                f"(its temporary {p.name} is in use): wait for it to finish, or write to "
                "another path"
            )
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _lock(fd: int) -> None:
    """Mark an open temporary (file or folder) as being written by this process."""
    if fcntl is not None:
        with contextlib.suppress(OSError):  # a file system without locks: written all the same
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _in_use(path: Path) -> bool:
    """Whether a live process holds :func:`_lock` on ``path`` (never through a link)."""
    if fcntl is None or path.is_symlink():
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no locks on this file system: nothing to tell a live write by
        return False
    finally:
        os.close(fd)  # closing drops the probe's own lock
    return False


@contextlib.contextmanager
def atomic_write(path: Path, force: bool = False) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it to ``path``.

    Temporary files a killed earlier write of ``path`` left are removed first.

    Raises:
        CheckpointError: If ``path`` exists and ``force`` is False, or the disk is full.
    """
    path = Path(path)
    if path.exists() and not force:
        raise CheckpointError(f"{path} already exists: pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = _temp_name(path)
    f = None
    try:
        f = open(tmp, "xb", buffering=0)  # exclusive create: never opens an existing link
        _lock(f.fileno())
        yield f
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise _disk_error(e, path) from e
    finally:
        if f is not None:
            f.close()
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_folder(out: Path, superseded: Callable[[str], bool] = lambda name: False
                  ) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out`` for a multi-file output; publish it on
    success.

    A new ``out`` is the staging folder renamed, so a kill at any moment leaves either no
    ``out`` or a complete one. Into an existing ``out`` the files are moved one by one (each
    complete); then the files there that ``superseded(name)`` marks as part of an earlier
    output of the same kind (e.g. its other shards) and that the new output lacks are removed.
    Leftover staging folders of ``out`` from killed runs are removed first; on failure this
    run's staging folder is removed too.

    Raises:
        CheckpointError: If the disk is full or a file cannot be moved.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    staging = _temp_name(out)
    staging.mkdir()
    held = os.open(staging, os.O_RDONLY)
    try:
        _lock(held)
        yield staging
        names = {p.name for p in staging.iterdir()}
        if not out.exists():
            os.rename(staging, out)
        else:
            for name in sorted(names):
                os.replace(staging / name, out / name)
            for p in out.iterdir():
                if p.name not in names and superseded(p.name) and p.is_file():
                    p.unlink()
            _fsync_dir(out)
        _fsync_dir(out.parent)
    except OSError as e:
        raise _disk_error(e, out) from e
    finally:
        os.close(held)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    # Make the rename itself durable; not possible (nor needed) on Windows.
    if sys.platform != "win32":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: Path, text: str, force: bool = True) -> None:
    """Write a small text file (JSON sidecars, configs) atomically."""
    with atomic_write(path, force=force) as f:
        _write_all(f.fileno(), text.encode())


def _write_order(plans: list[TensorPlan]) -> list[tuple[int, list[FileRange] | None]]:
    """(plan index, file ranges or None) in the order to write the plans' data.

    Neither format ties where a tensor's bytes sit to the order of its keys (torch finds
    records by name, safetensors by offsets), so copied tensors go in source-file order: the
    source is then read front to back, as ``cp`` reads it, and read-ahead keeps up. Tensors
    that must be computed follow, in key order.
    """
    ranges = [plan.file_ranges() for plan in plans]
    copied = sorted((i for i, r in enumerate(ranges) if r is not None),
                    key=lambda i: (ranges[i][0].path, ranges[i][0].offset))
    computed = [i for i, r in enumerate(ranges) if r is None]
    return [(i, ranges[i]) for i in copied + computed]


def _produce(
    plans: list[TensorPlan], order: list[tuple[int, list[FileRange] | None]]
) -> Iterator[tuple[int, TensorPlan, list[FileRange] | None, torch.Tensor | None]]:
    """Yield (index, plan, ranges, None) for plans copied file to file and (index, plan,
    None, tensor) for the rest, making the next tensor in a thread while this one is written."""
    todo = [i for i, r in order if r is None]
    with ThreadPoolExecutor(1, thread_name_prefix="tune-ckpt-make") as pool:
        pending = {i: pool.submit(plans[i].make) for i in todo[:1]}
        for i, ranges in order:
            plan = plans[i]
            if ranges is not None:
                yield i, plan, ranges, None
                continue
            tensor = pending.pop(i).result()
            following = todo.index(i) + 1
            if following < len(todo):
                j = todo[following]
                pending[j] = pool.submit(plans[j].make)
            if tuple(tensor.shape) != plan.shape or tensor.dtype != plan.dtype:
                raise CheckpointError(
                    f"internal error: '{plan.key}' came out {tuple(tensor.shape)} {tensor.dtype}, "
                    f"planned {plan.shape} {plan.dtype}"
                )
            yield i, plan, None, tensor


class _RangeCopier:
    """Copies byte ranges of source files into an open output file, in the kernel."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()  # the CRC thread opens files too
        self._kernel_copy = hasattr(os, "copy_file_range")

    def _fd(self, path: str) -> int:
        with self._lock:
            if path not in self._fds:
                fd = os.open(path, os.O_RDONLY)
                if hasattr(os, "posix_fadvise"):  # as cp does: a larger read-ahead window
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                self._fds[path] = fd
            return self._fds[path]

    def copy(self, ranges: list[FileRange], out_fd: int) -> None:
        merged: list[list] = []  # adjacent runs (wq, wk, wv) become one copy
        for path, offset, length, _ in ranges:
            if merged and merged[-1][0] == path and merged[-1][1] + merged[-1][2] == offset:
                merged[-1][2] += length
            else:
                merged.append([path, offset, length])
        for path, offset, length in merged:
            src = self._fd(path)
            while length and self._kernel_copy:
                try:
                    n = os.copy_file_range(src, out_fd, length, offset)
                except OSError as e:  # e.g. across file systems on older kernels
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP,
                                       errno.EINVAL):
                        raise
                    self._kernel_copy = False
                    break
                if n == 0:
                    raise CheckpointError(f"{path} ended early: the file is truncated")
                offset, length = offset + n, length - n
            for start in range(offset, offset + length, _WINDOW):
                with _window(src, start, min(_WINDOW, offset + length - start)) as view:
                    _write_all(out_fd, view)

    def crc32(self, ranges: list[FileRange]) -> int:
        """CRC-32 of the ranges laid end to end: combined from the sources' recorded CRCs,
        reading only the bytes whose CRC is not recorded."""
        crc = 0
        for path, offset, length, known in ranges:
            if known is None:
                known = 0
                for start in range(offset, offset + length, _WINDOW):
                    size = min(_WINDOW, offset + length - start)
                    with _window(self._fd(path), start, size) as view:
                        known = zlib.crc32(view, known)
            crc = crc32_combine(crc, known, length)
        return crc

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


_WINDOW = 64 << 20  # bytes mapped at a time to read a range: bounds the resident memory


def _crc_multiply(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial, both in zlib's bit-reversed representation."""
    product, bit = 0, 1 << 31
    while a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ 0xEDB88320 if b & 1 else b >> 1
    return product


# _X8N[k] = x^(8 * 2^k) mod P: appending 2^k zero bytes multiplies a CRC register by it.
_X8N = [1 << 23]  # x^8
for _ in range(63):
    _X8N.append(_crc_multiply(_X8N[-1], _X8N[-1]))


def crc32_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """``zlib.crc32(a + b)`` from ``crc32(a)``, ``crc32(b)`` and ``len(b)``, reading nothing.

    CRC-32 is linear: the CRC of a then b is a's register shifted past len(b) bytes (a
    multiplication by x^(8 len(b)) mod P) XOR b's CRC; the pre- and post-inversions cancel.
    """
    shift, k = 1 << 31, 0  # x^0
    while length_b:
        if length_b & 1:
            shift = _crc_multiply(_X8N[k], shift)
        length_b >>= 1
        k += 1
    return _crc_multiply(shift, crc_a) ^ crc_b


@contextlib.contextmanager
def _window(fd: int, offset: int, length: int) -> Iterator[memoryview]:
    """A read-only memory view of file bytes, unmapped afterwards (so it never stays in RSS)."""
    if length == 0:
        yield memoryview(b"")
        return
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(fd, length + offset - start, offset=start, access=mmap.ACCESS_READ) as m:
        whole = memoryview(m)
        part = whole[offset - start :]
        try:
            yield part
        finally:
            part.release()
            whole.release()


def _progress(plans: list[TensorPlan], desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=sum(p.nbytes for p in plans), unit="B", unit_scale=True, unit_divisor=1024,
        desc=desc, disable=None if enabled else True, leave=False,
    )


# The streaming .pt writer pickles tensors the way torch.save does without having their data,
# which takes two private torch names: the function torch.load calls to rebuild a tensor, and
# the dtype -> storage class table. Both have been stable since torch 1.x; a test names them
# (tests/test_convert.py::test_private_torch_names_the_pt_writer_uses) and, should a torch
# release move them, write_torch_file falls back to torch.save (the whole state in memory).
PRIVATE_TORCH_NAMES = ("torch._utils._rebuild_tensor_v2",
                       "torch.storage._dtype_to_storage_type_map")


def _private_torch_api() -> tuple[Callable, Callable] | None:
    """(_rebuild_tensor_v2, _dtype_to_storage_type_map), or None if torch no longer has them."""
    rebuild = getattr(getattr(torch, "_utils", None), "_rebuild_tensor_v2", None)
    storage_types = getattr(getattr(torch, "storage", None), "_dtype_to_storage_type_map", None)
    if not callable(rebuild) or not callable(storage_types):
        return None
    return rebuild, storage_types


class _StorageRef:
    """Stands for one tensor's storage in the pickle; torch.load finds it as data/<key>."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles as torch.save pickles a contiguous CPU tensor, without having its data."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...], rebuild: Callable):
        self.storage, self.shape, self.rebuild = storage, shape, rebuild

    def __reduce_ex__(self, protocol):
        stride, step = [], 1
        for size in reversed(self.shape):
            stride.append(step)
            step *= size
        args = (self.storage, 0, self.shape, tuple(reversed(stride)), False,
                collections.OrderedDict())
        return self.rebuild, args


class _TorchPickler(pickle.Pickler):
    def __init__(self, f: BinaryIO, storage_types: Callable, **kwargs):
        super().__init__(f, **kwargs)
        self.storage_types = storage_types

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            storage_type = getattr(torch, self.storage_types()[obj.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None


def _torch_pickle(plans: list[TensorPlan], api: tuple[Callable, Callable]) -> bytes:
    rebuild, storage_types = api
    state = {
        p.key: _TensorRef(_StorageRef(str(i), p.dtype, p.nbytes // p.dtype.itemsize), p.shape,
                          rebuild)
        for i, p in enumerate(plans)
    }
    buf = io.BytesIO()
    _TorchPickler(buf, storage_types, protocol=2).dump(state)
    return buf.getvalue()


class _ZipWriter:
    """A stored (uncompressed) ZIP64 archive written record by record, data 64-byte aligned.

    This is the container torch.save writes and torch.load (miniz) reads. Every entry carries
    ZIP64 sizes and offsets, so small test files exercise the same code path as a 13 GB model.
    The CRC-32 of a record is computed in a second thread while the record is written, then
    patched into its local header.
    """

    ALIGN = 64

    def __init__(self, f: BinaryIO, prefix: str):
        self._fd = f.fileno()
        self._prefix = prefix
        self._pos = 0
        self._entries: list[tuple[bytes, int, int, int]] = []  # name, crc, size, offset
        self._crc_pool = ThreadPoolExecutor(1, thread_name_prefix="tune-ckpt-crc")

    def _write(self, data: bytes | memoryview) -> None:
        _write_all(self._fd, data)
        self._pos += memoryview(data).nbytes

    def _header(self, name: str, size: int) -> int:
        """Write a record's local header (CRC patched later); return the record's offset."""
        name_b = f"{self._prefix}/{name}".encode()
        offset = self._pos
        zip64 = struct.pack("<HHQQ", 0x0001, 16, size, size)
        # Pad with an extra field (id "FB", as torch does) so the data starts on ALIGN bytes.
        before_pad = offset + 30 + len(name_b) + len(zip64) + 4
        pad = -before_pad % self.ALIGN
        extra = zip64 + struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        header = struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 45, 0x0800, 0, 0, 0x21, 0, 0xFFFFFFFF, 0xFFFFFFFF,
            len(name_b), len(extra),
        )
        self._write(header + name_b + extra)
        return offset

    def _finish_record(self, name: str, offset: int, size: int, crc: int) -> None:
        os.pwrite(self._fd, struct.pack("<I", crc), offset + 14)
        self._entries.append((f"{self._prefix}/{name}".encode(), crc, size, offset))

    def record(self, name: str, data: bytes | memoryview) -> None:
        data = memoryview(data).cast("B")
        offset = self._header(name, data.nbytes)
        crc = self._crc_pool.submit(zlib.crc32, data)
        self._write(data)
        self._finish_record(name, offset, data.nbytes, crc.result())

    def record_ranges(self, name: str, ranges: list[FileRange], copier: _RangeCopier) -> None:
        """A record whose bytes are copied from source files; its CRC read alongside."""
        size = sum(r.length for r in ranges)
        offset = self._header(name, size)
        crc = self._crc_pool.submit(copier.crc32, ranges)
        copier.copy(ranges, self._fd)
        self._pos += size
        self._finish_record(name, offset, size, crc.result())

    def close(self) -> None:
        self._crc_pool.shutdown()

    def finish(self) -> None:
        cd_offset = self._pos
        for name_b, crc, size, offset in self._entries:
            extra = struct.pack("<HHQQQ", 0x0001, 24, size, size, offset)
            self._write(
                struct.pack(
                    "<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0x0800, 0, 0, 0x21, crc,
                    0xFFFFFFFF, 0xFFFFFFFF, len(name_b), len(extra), 0, 0, 0, 0, 0xFFFFFFFF,
                )
                + name_b
                + extra
            )
        n, cd_size, eocd64 = len(self._entries), self._pos - cd_offset, self._pos
        self._write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, cd_size,
                                cd_offset))
        self._write(struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1))
        self._write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF),
                                min(cd_size, 0xFFFFFFFF), 0xFFFFFFFF, 0))


def write_torch_file(
    path: Path, plans: list[TensorPlan], *, force: bool = False, progress: bool = True
) -> None:
    """Stream planned tensors into a ``torch.load``-able ``.pt`` file, one tensor in memory.

    Without the private torch names the streaming writer needs (:data:`PRIVATE_TORCH_NAMES`),
    the tensors are made all at once and written by ``torch.save``, atomically all the same.
    """
    path = Path(path)
    api = _private_torch_api()
    if api is None:
        _torch_save_file(path, plans, force=force)
        return
    pickled = _torch_pickle(plans, api)
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(atomic_write(path, force))
        bar = stack.enter_context(_progress(plans, f"Writing {path.name}", progress))
        zf = _ZipWriter(f, "archive")
        stack.callback(zf.close)
        copier = _RangeCopier()
        stack.callback(copier.close)
        zf.record("data.pkl", pickled)
        zf.record(".format_version", b"1")
        zf.record(".storage_alignment", b"64")
        zf.record("byteorder", sys.byteorder.encode())
        for i, plan, ranges, tensor in _produce(plans, _write_order(plans)):
            if ranges is not None:
                zf.record_ranges(f"data/{i}", ranges, copier)
            else:
                zf.record(f"data/{i}", _tensor_bytes(tensor))
            del tensor
            plan.release()
            bar.update(plan.nbytes)
        zf.record("version", b"3\n")
        zf.record(".data/serialization_id", hashlib.sha1(pickled).hexdigest().encode())
        zf.finish()


def _torch_save_file(path: Path, plans: list[TensorPlan], *, force: bool) -> None:
    # Each tensor is cloned out of its (mapped) source so that torch.save writes the
    # tensor's own bytes, not the whole storage of a file mapping it is a view of.
    state = {p.key: p.make().detach().cpu().contiguous().clone() for p in plans}
    with atomic_write(path, force) as f:
        buffered = io.BufferedWriter(f)  # the raw file may write less than it is given
        torch.save(state, buffered)
        buffered.flush()
        buffered.detach()  # atomic_write fsyncs and closes the file itself
    for plan in plans:
        plan.release()


def write_safetensors_file(
    path: Path,
    plans: list[TensorPlan],
    *,
    metadata: dict[str, str] | None = None,
    force: bool = False,
    progress: bool = True,
) -> None:
    """Stream planned tensors into a ``.safetensors`` file: header first, then the data."""
    path = Path(path)
    for plan in plans:
        if plan.dtype not in _SAFETENSORS_NAMES:
            raise CheckpointError(f"cannot store '{plan.key}' ({plan.dtype}) in safetensors")
    order = _write_order(plans)
    offsets, offset = {}, 0
    for i, _ in order:
        offsets[i] = [offset, offset + plans[i].nbytes]
        offset += plans[i].nbytes
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    for i, plan in enumerate(plans):  # keys in plan order, data in write order
        header[plan.key] = {"dtype": _SAFETENSORS_NAMES[plan.dtype], "shape": list(plan.shape),
                            "data_offsets": offsets[i]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 64)  # the format allows trailing spaces: align the data
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(atomic_write(path, force))
        bar = stack.enter_context(_progress(plans, f"Writing {path.name}", progress))
        copier = _RangeCopier()
        stack.callback(copier.close)
        _write_all(f.fileno(), len(text).to_bytes(8, "little") + text)
        for _, plan, ranges, tensor in _produce(plans, order):
            if ranges is not None:
                copier.copy(ranges, f.fileno())
            else:
                _write_all(f.fileno(), _tensor_bytes(tensor))
            del tensor
            plan.release()
            bar.update(plan.nbytes)


def write_tensor_file(
    path: Path, plans: list[TensorPlan], *, force: bool = False, progress: bool = True
) -> None:
    """``.pt`` or ``.safetensors`` by suffix."""
    path = Path(path)
    if path.suffix == ".safetensors":
        write_safetensors_file(path, plans, force=force, progress=progress)
    elif path.suffix == ".pt":
        write_torch_file(path, plans, force=force, progress=progress)
    else:
        raise CheckpointError(
            f"output file {path} must end in .pt or .safetensors (the format is chosen by suffix)"
        )


def plans_from_dict(sd: dict[str, torch.Tensor]) -> list[TensorPlan]:
    """Plans that write an in-memory state dict as it is."""
    source = DictSource(sd)
    return [
        TensorPlan(k, tuple(v.shape), v.dtype, lambda k=k: source.get(k)) for k, v in sd.items()
    ]
