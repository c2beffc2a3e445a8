"""Loading records: through Hugging Face ``datasets`` (a hub name or local files), and a
direct reader for local JSON that skips ``datasets``' Arrow conversion and its import."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tune_data.errors import DataError

if TYPE_CHECKING:  # datasets takes ~1 s to import; tokenizer-only users never pay for it
    import datasets

# File extension -> datasets' packaged builder.
BUILDERS = {
    ".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
    ".txt": "text", ".text": "text", ".arrow": "arrow",
}
DataFiles = str | Path | Sequence[str | Path]


def check_source(what: str, source: str | None, data_files: DataFiles | None,
                 max_seq_len: int | None) -> str:
    """The arguments every dataset builder shares, checked; returns the source ("" for none).

    Args:
        what: The dataset's kind for the message, e.g. "a chat dataset".

    Raises:
        DataError: max_seq_len below 2 (nothing to predict), or neither source nor data_files.
    """
    if max_seq_len is not None and max_seq_len < 2:
        raise DataError(f"max_seq_len must be at least 2 tokens, got {max_seq_len}")
    if source is None and data_files is None:
        raise DataError(f"{what} needs a source (hub name or file; dataset_source in a config) "
                        "or data_files")
    return source or ""


def load_records(
    source: str,
    data_files: DataFiles | None = None,
    split: str = "train",
    cache_dir: str | Path | None = None,
    **load_kwargs: Any,
) -> datasets.Dataset:
    """Load one split with ``datasets.load_dataset``, from the hub or from local files.

    Args:
        source: A hub dataset name (``"tatsu-lab/alpaca"``), a local file or folder, or a
            builder name (``"json"``, ``"csv"``, ``"parquet"``, ``"text"``) used with data_files.
        data_files: Local json / jsonl / csv / parquet / txt file(s). When given, the builder
            comes from ``source`` if it names one, else from the file extension.
        split: Split to load, e.g. ``"train"`` or ``"train[:10%]"``.
        cache_dir: Where ``datasets`` keeps its Arrow cache (default: its own).
        **load_kwargs: Passed on to ``datasets.load_dataset``.

    Returns:
        The split as a ``datasets.Dataset``.

    Raises:
        DataError: If a file is missing, its type unknown, or the hub cannot be reached.
    """
    import datasets

    if data_files is None and _looks_like_local_path(source):
        data_files, source = source, ""
    kwargs: dict[str, Any] = {"split": split, "cache_dir": cache_dir, **load_kwargs}
    files: list[str] = []
    if data_files is not None:
        files = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
        if not files:
            raise DataError("data_files is empty; pass at least one local data file")
        files = [_existing_file(f) for f in files]
        source = source if source in set(BUILDERS.values()) else _builder_for(files[0])
        if source == "csv":
            # An empty csv cell is an empty string (an Alpaca record without input), not NaN.
            kwargs.setdefault("keep_default_na", False)
            if Path(files[0]).suffix.lower() == ".tsv":
                kwargs.setdefault("sep", "\t")
            if "converters" not in kwargs and "features" not in kwargs:
                # A csv cell is text even where it looks like a number (an answer `4`, not
                # the 4.0 of a column pandas made float).
                header = _csv_header(files[0], kwargs.get("sep") or kwargs.get("delimiter"))
                if header:
                    kwargs["converters"] = dict.fromkeys(header, str)
        if source == "text":
            kwargs.setdefault("sample_by", "document")
        kwargs["data_files"] = files
    try:
        return datasets.load_dataset(source, **kwargs)
    except Exception as error:  # datasets raises many types; the user needs one line
        if source == "json":  # name the line that does not parse
            for f in files:
                if Path(f).is_file():
                    syntax = json_syntax_error(f, Path(f).read_bytes())
                    if syntax is not None:
                        raise syntax from error
        if files:
            raise DataError(
                f"could not read {', '.join(files)} ({_first_line(_root_cause(error))}); "
                "check the file format"
            ) from error
        raise DataError(
            f"could not load '{source}' from the Hugging Face Hub ({_first_line(error)}); "
            "check the name "
            "and your connection, or pass data_files= a local json/jsonl/csv/parquet file"
        ) from error


def _csv_header(path: str, sep: str | None) -> list[str]:
    """The column names of a local csv file ([] if it cannot be read here; datasets will say
    what is wrong with it)."""
    import csv

    if not Path(path).is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f, delimiter=sep or ","), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _root_cause(error: BaseException) -> BaseException:
    """The innermost cause: datasets wraps a file's parse error in a generic one."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _looks_like_local_path(source: str) -> bool:
    return bool(source) and (Path(source).suffix.lower() in BUILDERS or Path(source).exists())


def _existing_file(path: str | Path) -> str:
    text = str(path)
    if any(ch in text for ch in "*?[") or text.startswith(("hf://", "http://", "https://")):
        return text  # globs and URLs are datasets' business
    if not Path(text).exists():
        raise DataError(f"data file {text} not found; check the path")
    return text


def _builder_for(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in BUILDERS:
        raise DataError(
            f"cannot tell the format of {path} from its extension '{suffix}'; use one of "
            f"{', '.join(sorted(BUILDERS))} or pass source='json' (or csv, parquet, text)"
        )
    return BUILDERS[suffix]


def check_columns(ds: datasets.Dataset, columns: Sequence[str], where: str, hint: str) -> None:
    """Fail on the first missing column, missing (null) value or value that is not text,
    naming the row and column.

    A number, list or object where text belongs would otherwise be trained on as its Python
    spelling (``['a', 'b']``), which nobody means.

    Args:
        ds: The loaded records.
        columns: Columns every record needs, as text.
        where: What to call the data in the message (file or hub name).
        hint: The fix to suggest for a missing column.

    Raises:
        DataError: Naming the first record (counting from 0) and the column.
    """
    import pyarrow.compute as pc

    for name in columns:
        if name not in ds.column_names:
            have = ", ".join(ds.column_names) or "none"
            raise DataError(
                f"{where}: row 0 has no '{name}' column (columns: {have}); {hint}"
            )
        column = ds.data.column(name)
        row = pc.index(pc.is_null(column), True).as_py() if column.null_count else None
        if row is None and not _is_text(ds.features[name]):
            # Not a text column (numbers, lists, objects, or text mixed with them): find the
            # first value that is not a string, or a null hidden in a mixed column.
            row, value = next(
                ((r, v) for r, v in enumerate(ds[name]) if not isinstance(v, str)), (None, None)
            )
            if value is not None:
                raise DataError(
                    f"{where}: row {row} (counting from 0) has {_kind(value)} in '{name}' "
                    f"({_preview(value)}), not text; write it as a string in the data, or "
                    "remove the row"
                )
        if row is not None:
            raise DataError(
                f"{where}: row {row} (counting from 0) has no '{name}'; "
                "fill it in (an empty string is fine) or remove the row"
            )


def _is_text(feature: Any) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _preview(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def local_json_files(
    source: str,
    data_files: DataFiles | None,
    split: str,
    load_kwargs: Mapping[str, Any],
) -> list[Path] | None:
    """The files, when :func:`load_records` would read whole local files with the json builder.

    That is the case a direct read can match exactly: existing local files, the whole
    ``"train"`` split, no extra loading options. Anything else (hub names, globs, split slices
    such as ``"train[:10%]"``, csv) is left to ``datasets``.
    """
    if data_files is None and _looks_like_local_path(source):
        data_files, source = source, ""
    if data_files is None or split != "train" or load_kwargs:
        return None
    files = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
    paths = [Path(f) for f in files]
    if not paths or not all(p.is_file() for p in paths):
        return None
    builder = source if source in set(BUILDERS.values()) else BUILDERS.get(paths[0].suffix.lower())
    return paths if builder == "json" else None


def read_json_columns(
    blobs: Sequence[bytes], columns: Sequence[str]
) -> tuple[dict[str, list[str]], int] | None:
    """Text columns of JSON / JSON Lines file contents, read with the json module.

    ``datasets`` would give the same strings, after converting the file to Arrow on disk
    (~0.2 s for Alpaca 5k, where this takes ~20 ms). Whenever its conversions could matter, this
    answers None and the caller goes through ``datasets``, so both routes give the same
    records and the same errors: a value that is missing, null or not a string, a record that
    is not an object, blank lines, text that is not UTF-8 or not JSON, no records at all.

    Args:
        blobs: Each file's bytes, in order (records are numbered across them).
        columns: The columns to return.

    Returns:
        ``({column: values}, number of records)``, or None.
    """
    records: list[dict] = []
    for blob in blobs:
        part = _json_records(blob)
        if part is None:
            return None
        records += part
    if not records:
        return None
    out: dict[str, list[str]] = {}
    for column in columns:
        try:
            values = [r[column] for r in records]
        except KeyError:
            return None
        if set(map(type, values)) != {str}:
            return None
        out[column] = values
    return out, len(records)


def json_syntax_error(path: str | Path, blob: bytes) -> DataError | None:
    """The one-line error for a local JSON / JSON Lines file that does not parse, naming the
    line (``datasets`` names a byte position, or a row of its own counting); None if it
    parses (its records may still be refused for other reasons, by the reader)."""
    try:
        text = blob.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        return DataError(f"{path} is not UTF-8 text (byte {blob[e.start]:#04x} at position "
                         f"{e.start:,}); save it as UTF-8")
    if text.lstrip().startswith("["):  # one JSON array, as datasets reads such a file
        try:
            json.loads(text)
        except ValueError as e:
            where = f"line {e.lineno}, column {e.colno}: " if hasattr(e, "lineno") else ""
            return DataError(f"{path} is not valid JSON ({where}{getattr(e, 'msg', e)}); fix "
                             "the file")
        except RecursionError:
            return DataError(f"{path} nests too deeply to read as JSON")
        return None
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            return DataError(f"{path}: line {number} is not valid JSON ({getattr(e, 'msg', e)} "
                             f"at column {getattr(e, 'colno', '?')}); fix or remove that line")
        except RecursionError:
            return DataError(f"{path}: line {number} nests too deeply to read as JSON")
        if not isinstance(record, dict):
            return DataError(f"{path}: line {number} is a JSON {type(record).__name__}, not an "
                             "object; JSON Lines holds one record ({...}) per line")
    return None


def _json_records(blob: bytes) -> list[dict] | None:
    """The objects of a JSON array or of JSON Lines, as ``datasets``' json builder reads them."""
    try:
        text = blob.decode("utf-8").removeprefix("\ufeff")
        if text.startswith("["):  # what datasets takes for a JSON array
            records = json.loads(text)
        else:
            lines = text.split("\n")
            while lines and not lines[-1].strip():
                lines.pop()
            if not all(map(str.strip, lines)):
                return None
            records = list(map(json.loads, lines))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(records, list) or set(map(type, records)) - {dict}:
        return None
    return records
