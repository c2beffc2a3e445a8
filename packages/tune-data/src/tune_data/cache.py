"""Tokenized datasets cached on disk as Arrow files, for data read without ``datasets``.

Local JSON files are tokenised straight from the records (see :mod:`tune_data.sources`), so
``datasets``' own map cache is not there to reuse. This keeps the result in one Arrow stream
file, the format ``datasets`` writes, named by a hash of everything that shapes it (the
files' bytes, the tokenizer, the template and the settings): the second build reads it back
in milliseconds, and ``datasets.Dataset.from_file`` opens it as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

from tune_data.dataset import TokenizedArrays

_SUBDIR = "tune_data"


def default_cache_dir() -> Path:
    """``datasets``' cache folder, found the way ``datasets`` finds it, without importing it."""
    if "datasets" in sys.modules:  # it may have been moved in this process
        return Path(sys.modules["datasets"].config.HF_DATASETS_CACHE)
    if "HF_DATASETS_CACHE" in os.environ:
        return Path(os.environ["HF_DATASETS_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    home = os.environ.get("HF_HOME", os.path.join(xdg, "huggingface"))
    return Path(os.path.expanduser(home)) / "datasets"


def caching_enabled() -> bool:
    """False after ``datasets.disable_caching()``: then nothing is written."""
    datasets = sys.modules.get("datasets")
    return datasets is None or datasets.is_caching_enabled()


def cache_file(cache_dir: str | Path | None, key: str) -> Path:
    """Where the dataset made under ``key`` (a repr of everything that shapes it) is kept."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / _SUBDIR / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.arrow"


def read(path: Path, key: str) -> tuple[TokenizedArrays, int] | None:
    """The arrays and source record count cached at ``path``, or None if absent or unusable.

    A file written for another key (a hash collision, a format change) or cut short (a crash
    mid-write on a file system without atomic rename) reads as absent and is rebuilt.
    """
    if not path.is_file():
        return None
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
        meta = json.loads(table.schema.metadata[b"tune_data"])
        if meta["key"] != key:
            return None
        return TokenizedArrays.from_arrow(table), int(meta["source_rows"])
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return None


def write(path: Path, arrays: TokenizedArrays, source_rows: int, key: str) -> bool:
    """Write atomically (temp file, rename); False if the folder is not writable.

    No fsync: a cache file lost to a crash is only rebuilt, and :func:`read` refuses a
    partial one.
    """
    import pyarrow as pa

    table = arrays.to_arrow()
    meta = {b"tune_data": json.dumps({"key": key, "source_rows": source_rows}).encode()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide a shared cache
            with pa.ipc.new_stream(f, table.schema) as writer:
                writer.write_table(table)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        return False
    return True


def digest(data: bytes) -> str:
    """Content hash of a data file, part of the cache key."""
    return hashlib.sha256(data).hexdigest()
