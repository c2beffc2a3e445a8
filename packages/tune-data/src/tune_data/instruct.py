"""Instruction datasets (Alpaca and any prompt/response columns): template, tokenise, mask.

A sample is ``BOS + prompt + response + EOS`` with the ids of the whole text: the prompt's
tokens are those of ``encode(prompt + response)`` up to where ``encode(prompt)`` stops
agreeing with it (the plain reference, :meth:`_Encoder._encode_whole`). Speed comes from
these choices, measured in ``benchmarks/data.py``:

* local JSON / JSON Lines files are read with the json module and tokenised straight into
  flat arrays, cached in one Arrow file (:mod:`tune_data.cache`); ``datasets`` (its import,
  its Arrow conversion of the file, its map machinery) is used for everything else, through
  ``datasets.map(batched=True)`` and its cache. Both routes give identical samples;
* the template's fixed text is tokenised once: where the tokenizer allows it
  (:attr:`Tokenizer.cuts_after_newline`: Llama 2, Mistral, Llama 3, Qwen2) a text cut just
  after a newline whose next character is not whitespace encodes part by part exactly as it
  does whole, so only the records' own fields (each with the template text up to the next
  cut) go through the tokenizer. A record whose field starts with whitespace is encoded
  whole;
* the tokenizer encodes those parts its fastest way (SentencePiece: one distinct word at a
  time), and numpy joins fields and template text into samples, truncating them in the same
  pass.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tune_data import cache
from tune_data.dataset import TokenizedArrays, TokenizedDataset, prefix_mask
from tune_data.ragged import flatten, gather
from tune_data.sources import (
    DataFiles,
    check_columns,
    check_source,
    json_syntax_error,
    load_records,
    local_json_files,
    read_json_columns,
)
from tune_data.templates import ALPACA, PromptTemplate, as_template, is_empty_input
from tune_data.tokenizers import Tokenizer

# Bump when the tokenisation below changes, so stale cached datasets are not reused.
_FORMAT_VERSION = "instruct-3"  # 3: a per-token loss mask instead of a prompt length
_MAP_BATCH = 2048
_LOCAL_BATCH = 1 << 15  # records per tokenizer call when reading local JSON directly


@dataclass(frozen=True)
class _Part:
    """A piece of a template that ends at a cut: fixed text, or a field and what follows it."""

    literal: list[int] | None = None  # token ids of fixed template text, or
    field: str | None = None  # a record field, encoded together with
    suffix: str = ""  # the template text after it, up to the next cut
    first: bool = False  # the field opens the text (encoded as a text's start)


def _cut_after_first_newline(text: str) -> int | None:
    """Where ``text`` may be cut first: just after a newline followed by a character that
    is not whitespace; else its end if it ends with a newline (what follows decides); else
    None."""
    for i, char in enumerate(text[:-1]):
        if char == "\n" and not text[i + 1].isspace():
            return i + 1
    return len(text) if text.endswith("\n") else None


def _template_parts(template: str, tokenizer: Tokenizer) -> list[_Part] | None:
    """The template as parts that end at cuts, literals pre-tokenised; None if it cannot be cut.

    It can be cut when every field opens the template or follows a newline, the text after
    every field reaches a newline, and the template ends with a newline, where the response
    is appended.
    """
    if not tokenizer.cuts_after_newline or not template.endswith("\n"):
        return None
    parts: list[_Part] = []
    pending: str | None = None  # a field waiting for the template text after it
    previous = ""  # the template text before the next field
    for literal, field, spec, conversion in string.Formatter().parse(template):
        if spec or conversion:
            return None
        if literal and pending is not None:
            cut = _cut_after_first_newline(literal)
            if cut is None:
                return None
            parts.append(_Part(field=pending, suffix=literal[:cut], first=not parts))
            pending, previous, literal = None, literal[:cut], literal[cut:]
        if literal:
            ids = (
                [int(i) for i in tokenizer.encode_after_newline([literal])[0]]
                if parts
                else tokenizer.encode(literal, add_bos=False)
            )
            parts.append(_Part(literal=ids))
            previous = literal
        if field is not None:
            if pending is not None or (parts and not previous.endswith("\n")):
                return None
            pending = field
    return parts


class _Encoder:
    """Turns a batch of records into tokens, masked prompt lengths and truncation flags.

    A sample is a row of segments, ``BOS | prompt parts ... | response | EOS``, each a slice
    of one array that holds the template's pre-tokenised text and every field's ids; numpy
    joins and truncates them all at once.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: PromptTemplate,
        response_field: str,
        train_on_input: bool,
        max_seq_len: int | None,
    ):
        self.tokenizer = tokenizer
        self.template = template
        self.response_field = response_field
        self.train_on_input = train_on_input
        self.max_seq_len = max_seq_len
        self.with_input = _template_parts(template.template, tokenizer)
        self.without_input = (
            _template_parts(template.template_without_input, tokenizer)
            if template.template_without_input is not None
            else None
        )
        self.fast = self.with_input is not None and (
            template.template_without_input is None or self.without_input is not None
        )
        bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        self._ends = np.array([*bos, tokenizer.eos_id], dtype=np.int32)  # BOS run, EOS run

    def __call__(self, batch: Mapping[str, list[Any]], indices: list[int]):
        """For ``datasets.map(batched=True, with_indices=True)``: the batch as an Arrow table."""
        return self.encode(batch, np.asarray(indices, dtype=np.int64)).to_arrow()

    def encode(self, batch: Mapping[str, Sequence[Any]], rows: np.ndarray) -> TokenizedArrays:
        """Tokenise one batch of records (columns by field name); ``rows`` numbers them."""
        columns = {
            k: values if set(map(type, values)) <= {str} else [_text(v) for v in values]
            for k, values in batch.items()
        }
        n = len(rows)
        whole = np.ones(n, dtype=bool)  # records encoded whole (the reference path)
        results = []
        if self.fast:
            without = self._without_input(columns, n)
            plans = []
            for plan, members in ((self.with_input, ~without), (self.without_input, without)):
                records = np.flatnonzero(members)
                if plan is None or not len(records):
                    continue
                parts = (*plan, _Part(field=self.response_field))
                records = records[self._cuttable(parts, columns, records)]
                whole[records] = False
                plans.append((parts, records))
            results.append(self._encode_by_parts(columns, plans))
        if whole.any():
            results.append(self._encode_whole(columns, np.flatnonzero(whole)))
        return self._join(results, rows)

    def _without_input(self, columns: Mapping[str, list[str]], n: int) -> np.ndarray:
        """(n,) True where the record takes the template without input."""
        t = self.template
        if t.template_without_input is None:
            return np.zeros(n, dtype=bool)
        inputs = columns.get(t.input_field)
        if inputs is None:
            return np.ones(n, dtype=bool)
        return np.fromiter(map(is_empty_input, inputs), dtype=bool, count=n)

    @staticmethod
    def _cuttable(
        parts: Sequence[_Part], columns: Mapping[str, list[str]], records: np.ndarray
    ) -> np.ndarray:
        """(m,) True where every cut before a field is followed by a non-whitespace character
        (or ends the text), as :attr:`Tokenizer.cuts_after_newline` requires."""
        ok = np.ones(len(records), dtype=bool)
        for part in parts:
            if part.field is None or part.first:
                continue
            values, lead = columns[part.field], part.suffix[:1]
            ok &= np.fromiter(
                (not (values[r][:1] or lead).isspace() for r in records.tolist()),
                dtype=bool, count=len(records),
            )
        return ok

    def _encode_by_parts(
        self, columns: Mapping[str, list[str]], plans: list[tuple[Sequence[_Part], np.ndarray]]
    ) -> tuple[np.ndarray, list[_Group]]:
        tok = self.tokenizer
        literals: list[list[int]] = []
        texts: list[str] = []  # fields after a cut, each with its suffix: one tokenizer call
        firsts: list[str] = []  # a field that opens the template is encoded as a text start
        tables = []
        for parts, records in plans:
            if not len(records):
                continue
            # Column c of the group's segment table: (kind, index) in the joined source.
            table = []
            for part in parts:
                if part.literal is not None:
                    table.append(("literal", len(literals)))
                    literals.append(part.literal)
                    continue
                values = columns[part.field]
                into = firsts if part.first else texts
                table.append(("first" if part.first else "text", len(into)))
                suffix = part.suffix
                into += [values[r] + suffix for r in records.tolist()]
            tables.append((records, table))
        text_ids, text_offsets = tok.encode_after_newline(texts)
        first_ids, first_offsets = tok.encode_flat(firsts)
        literal_ids, literal_offsets = flatten(literals)
        ends = self._ends
        source = np.concatenate([ends, literal_ids, text_ids, first_ids])
        bases = {
            "literal": len(ends),
            "text": len(ends) + len(literal_ids),
            "first": len(ends) + len(literal_ids) + len(text_ids),
        }
        offsets = {"literal": literal_offsets, "text": text_offsets, "first": first_offsets}
        groups = []
        for records, table in tables:
            m = len(records)
            starts, lengths = self._segment_table(m, len(table))
            for c, (kind, index) in enumerate(table, start=1):
                # A literal is one run for every record; a field is a run of m texts.
                at = index if kind == "literal" else np.arange(index, index + m)
                begin, end = offsets[kind][at], offsets[kind][at + 1]
                starts[:, c], lengths[:, c] = bases[kind] + begin, end - begin
            groups.append(_Group(records, starts, lengths))
        return source, groups

    def _segment_table(self, m: int, inner: int) -> tuple[np.ndarray, np.ndarray]:
        """(m, inner + 2) starts and lengths with the BOS and EOS columns filled in; the
        source begins with ``self._ends``."""
        starts = np.zeros((m, inner + 2), dtype=np.int64)
        lengths = np.zeros_like(starts)
        n_bos = len(self._ends) - 1
        lengths[:, 0] = n_bos  # BOS (none for families without one)
        starts[:, -1], lengths[:, -1] = n_bos, 1  # EOS
        return starts, lengths

    def _encode_whole(
        self, columns: Mapping[str, list[str]], records: np.ndarray
    ) -> tuple[np.ndarray, list[_Group]]:
        # Any template, any tokenizer: encode prompt and prompt + response whole; the prompt
        # ends where the two stop agreeing (a trailing space joins the response's first piece).
        picked = [{k: v[i] for k, v in columns.items()} for i in records.tolist()]
        texts = [self.template.render(r) for r in picked]
        prompts = self.tokenizer.encode_batch(texts, add_bos=False)
        fulls = self.tokenizer.encode_batch(
            [t + r[self.response_field] for t, r in zip(texts, picked)], add_bos=False
        )
        m = len(picked)
        cut = np.fromiter(
            (_common_prefix(p, f) for p, f in zip(prompts, fulls)), dtype=np.int64, count=m
        )
        full_ids, full_offsets = flatten(fulls)
        source = np.concatenate([self._ends, full_ids])
        begin = full_offsets[:-1] + len(self._ends)
        end = full_offsets[1:] + len(self._ends)
        starts, lengths = self._segment_table(m, 2)
        starts[:, 1], lengths[:, 1] = begin, cut
        starts[:, 2], lengths[:, 2] = begin + cut, end - begin - cut
        return source, [_Group(records, starts, lengths)]

    def _join(
        self, results: list[tuple[np.ndarray, list[_Group]]], rows: np.ndarray
    ) -> TokenizedArrays:
        """Samples in record order from the groups' segments, truncated or dropped."""
        n = len(rows)
        head = np.zeros(n, dtype=np.int64)  # BOS + prompt tokens: the ones that take no loss
        total = np.zeros(n, dtype=np.int64)
        empty = np.zeros(0, dtype=np.int64)
        owner, starts, lengths = [empty], [empty], [empty]
        base = 0
        for source, groups in results:
            for g in groups:
                owner.append(np.repeat(g.records, g.starts.shape[1]))
                starts.append(g.starts.ravel() + base)
                lengths.append(g.lengths.ravel())
                head[g.records] = g.lengths[:, :-2].sum(axis=1)
                total[g.records] = g.lengths.sum(axis=1)
            base += len(source)
        source = np.concatenate([s for s, _ in results]) if results else np.zeros(0, np.int32)
        order = np.argsort(np.concatenate(owner), kind="stable")  # segments in record order
        tokens, _ = gather(source, np.concatenate(starts)[order], np.concatenate(lengths)[order])
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(total, out=offsets[1:])
        keep = np.ones(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        limit = self.max_seq_len
        if limit is not None and (total > limit).any():
            truncated = total > limit
            # No room for one response token: dropped, counted by describe(). Otherwise the
            # prompt stays whole and the response is cut. No EOS: the answer did not end
            # there, and teaching the model to stop mid-sentence is worse than not.
            keep = ~(truncated & (head >= limit))
            tokens, offsets = gather(
                tokens, offsets[:-1][keep], np.minimum(total, limit)[keep]
            )
        prompt_len = np.zeros(n, dtype=np.int64) if self.train_on_input else head
        return TokenizedArrays(
            tokens.astype(np.int32, copy=False), offsets, prefix_mask(offsets, prompt_len[keep]),
            rows[keep], truncated[keep],
        )


@dataclass
class _Group:
    """Records that share a template: (m, segments) starts and lengths into the source."""

    records: np.ndarray  # positions in the batch
    starts: np.ndarray
    lengths: np.ndarray


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def instruct_dataset(
    tokenizer: Tokenizer,
    source: str | None,
    template: PromptTemplate | str,
    *,
    column_map: Mapping[str, str] | None = None,
    response_field: str = "output",
    data_files: DataFiles | None = None,
    split: str = "train",
    train_on_input: bool = False,
    max_seq_len: int | None = 512,
    cache_dir: str | Path | None = None,
    **load_kwargs: Any,
) -> TokenizedDataset:
    """Prompt/response records, templated, tokenised and masked.

    Each sample is ``BOS + prompt + response + EOS``. Labels are -100 on the prompt unless
    ``train_on_input``. A sample longer than ``max_seq_len`` keeps its whole prompt and a cut
    response (without EOS); one whose prompt leaves no room for a response token is dropped.
    :func:`tune_data.describe` counts both.

    Args:
        tokenizer: The model's tokenizer.
        source: Hub dataset name, local file, or builder name (see
            :func:`tune_data.sources.load_records`); None to read ``data_files``.
        template: The prompt: a PromptTemplate, a ``str.format`` text over field names
            (``"### Question:\\n{question}\\n\\n### Answer:\\n"``) or a name ("alpaca").
        column_map: Field name -> column name, for data whose columns are named differently,
            e.g. ``{"instruction": "question", "output": "answer"}``.
        response_field: The field holding the response.
        data_files: Local json / jsonl / csv / parquet file(s).
        split: Split to load.
        train_on_input: Take the loss on the prompt as well.
        max_seq_len: Longest sample in tokens (None: no limit).
        cache_dir: ``datasets`` cache folder.
        **load_kwargs: Passed on to ``datasets.load_dataset``.

    Returns:
        The dataset; ``dataset[i]`` is ``{"tokens", "labels"}``.

    Raises:
        DataError: If the data cannot be loaded or a row lacks a column.
    """
    source = check_source("an instruct dataset", source, data_files, max_seq_len)
    template = as_template(template)
    column_map = dict(column_map or {})
    fields = [*template.fields, response_field]
    columns = [column_map.get(f, f) for f in fields]
    where = _describe_source(source, data_files)
    encoder = _Encoder(tokenizer, template, response_field, train_on_input, max_seq_len)
    settings = (
        tokenizer.fingerprint, template, response_field, train_on_input, max_seq_len,
        encoder.fast,
    )
    files = local_json_files(source, data_files, split, load_kwargs)
    if files is not None and len(set(columns)) == len(columns):
        built = _from_json_files(files, dict(zip(fields, columns)), encoder, settings, where,
                                 cache_dir)
        if built is not None:
            return built
    records = load_records(source, data_files, split, cache_dir, **load_kwargs)
    check_columns(
        records, columns, where,
        hint="name your columns with column_map={'" + fields[0] + "': 'your_column', ...}",
    )
    # Rename columns to field names and drop the rest, so the encoder sees fields only.
    records = records.select_columns(columns)
    rename = {c: f for f, c in zip(fields, columns) if c != f}
    if rename:
        records = records.rename_columns(rename)
    return _tokenize_records(
        records, encoder, (_FORMAT_VERSION, *settings), tokenizer, max_seq_len, where,
        short_name=data_files is not None, batch_size=_MAP_BATCH,
    )


def _from_json_files(
    files: list[Path],
    field_columns: dict[str, str],
    encoder: _Encoder,
    settings: tuple,
    where: str,
    cache_dir: str | Path | None,
) -> TokenizedDataset | None:
    """Local JSON read and tokenised without ``datasets``, cached in our own Arrow file.

    None when the records need ``datasets``' conversions (see
    :func:`tune_data.sources.read_json_columns`); the caller then takes that route, which
    gives the same samples, more slowly (Alpaca 5k: ~0.6 s instead of ~0.25 s cold).
    """
    blobs = [f.read_bytes() for f in files]
    key = repr((
        _FORMAT_VERSION, "json", [cache.digest(b) for b in blobs], *settings,
        sorted(field_columns.items()),
    ))
    path = cache.cache_file(cache_dir, key)
    hit = cache.read(path, key)
    if hit is not None:
        arrays, source_rows = hit
    else:
        read = read_json_columns(blobs, list(field_columns.values()))
        if read is None:
            _raise_json_syntax(files, blobs)
            return None
        values, source_rows = read
        batch = {f: values[c] for f, c in field_columns.items()}
        arrays = _encode_all(encoder, batch, source_rows, f"Tokenizing {Path(where).name}")
        if not (cache.caching_enabled() and cache.write(path, arrays, source_rows, key)):
            path = None
    return TokenizedDataset.from_arrays(
        arrays, tokenizer=encoder.tokenizer, name=where, source_rows=source_rows,
        max_seq_len=encoder.max_seq_len, cache_file=path,
    )


def _raise_json_syntax(files: Sequence[Path], blobs: Sequence[bytes]) -> None:
    """Name the line of a file that does not parse (before ``datasets`` is asked, which
    would log its own error and name a byte position)."""
    for file, blob in zip(files, blobs):
        error = json_syntax_error(file, blob)
        if error is not None:
            raise error


def _encode_all(
    encoder: _Encoder, batch: Mapping[str, list[str]], n: int, desc: str
) -> TokenizedArrays:
    """All records, in batches big enough for word reuse, with a progress bar past one."""
    if n <= _LOCAL_BATCH:
        return encoder.encode(batch, np.arange(n, dtype=np.int64))
    from tqdm.auto import tqdm

    parts = []
    with tqdm(total=n, desc=desc, unit=" records") as progress:
        for start in range(0, n, _LOCAL_BATCH):
            stop = min(start + _LOCAL_BATCH, n)
            chunk = {k: v[start:stop] for k, v in batch.items()}
            parts.append(encoder.encode(chunk, np.arange(start, stop, dtype=np.int64)))
            progress.update(stop - start)
    return TokenizedArrays.concatenate(parts)


def alpaca_dataset(
    tokenizer: Tokenizer,
    source: str = "tatsu-lab/alpaca",
    data_files: DataFiles | None = None,
    split: str = "train",
    train_on_input: bool = False,
    max_seq_len: int | None = 512,
    *,
    column_map: Mapping[str, str] | None = None,
    cache_dir: str | Path | None = None,
    **load_kwargs: Any,
) -> TokenizedDataset:
    """Stanford Alpaca records (instruction, input, output) with Alpaca's prompt template.

    Records whose input is empty or a placeholder such as ``<noinput>`` use the template
    without an input. See :func:`instruct_dataset` for masking, truncation and the arguments.

    Example:
        >>> ds = alpaca_dataset(tok, data_files="alpaca_5000.json", max_seq_len=512)
        >>> ds[0]["tokens"].shape, ds[0]["labels"].shape
    """
    return instruct_dataset(
        tokenizer, source, ALPACA, column_map=column_map, response_field="output",
        data_files=data_files, split=split, train_on_input=train_on_input,
        max_seq_len=max_seq_len, cache_dir=cache_dir, **load_kwargs,
    )


def alpaca_cleaned_dataset(
    tokenizer: Tokenizer,
    source: str = "yahma/alpaca-cleaned",
    data_files: DataFiles | None = None,
    split: str = "train",
    train_on_input: bool = False,
    max_seq_len: int | None = 512,
    *,
    column_map: Mapping[str, str] | None = None,
    cache_dir: str | Path | None = None,
    **load_kwargs: Any,
) -> TokenizedDataset:
    """Alpaca with the community's fixes (``yahma/alpaca-cleaned``); see :func:`alpaca_dataset`.

    The parameters are spelled out (not ``**kwargs``) so that a config passes exactly the
    arguments this builder takes (``tune_train.registry.dataset_arguments`` reads them).
    """
    return alpaca_dataset(
        tokenizer, source, data_files, split, train_on_input, max_seq_len,
        column_map=column_map, cache_dir=cache_dir, **load_kwargs,
    )


def _describe_source(source: str, data_files: DataFiles | None) -> str:
    if data_files is None:
        return source
    if isinstance(data_files, (str, Path)):
        return str(data_files)
    return ", ".join(str(f) for f in data_files)


def _tokenize_records(
    records, encode, settings: tuple, tokenizer: Tokenizer, max_seq_len: int | None,
    where: str, *, short_name: bool, batch_size: int, turns: bool = False,
) -> TokenizedDataset:
    """Run encode over the records with ``datasets.map`` (cached under the records'
    fingerprint and the settings that change the output) and wrap the result."""
    key = repr((records._fingerprint, *settings))
    tokenized = records.map(
        encode, batched=True, with_indices=True, batch_size=batch_size,
        remove_columns=records.column_names, features=_features(turns),
        new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32],
        desc=f"Tokenizing {Path(where).name if short_name else where}",
    )
    return TokenizedDataset.from_hf(
        tokenized, tokenizer=tokenizer, name=where, source_rows=len(records),
        max_seq_len=max_seq_len,
    )


def _features(turns: bool = False):
    """The columns of :meth:`TokenizedArrays.to_arrow` as ``datasets`` features."""
    import datasets

    columns = {
        "tokens": datasets.List(datasets.Value("int32")),
        "trained": datasets.List(datasets.Value("bool")),
        "row": datasets.Value("int64"),
        "truncated": datasets.Value("bool"),
    }
    if turns:
        columns["turn_starts"] = datasets.List(datasets.Value("int32"))
        columns["turn_roles"] = datasets.List(datasets.Value("int8"))
    return datasets.Features(columns)
