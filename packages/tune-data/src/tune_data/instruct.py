"""Instruction datasets (Alpaca and any prompt/response columns): template, tokenise, mask.

Speed comes from three choices, measured in ``benchmarks/data.py``:

* records are tokenised in batches through ``datasets.map(batched=True)``, which caches the
  result on disk keyed by a fingerprint of the data, tokenizer and settings;
* SentencePiece encodes each batch on every core (its own thread pool);
* the template's fixed text is tokenised once: for Llama 2 a newline is a boundary no piece
  crosses, so a prompt cut at newlines encodes part by part exactly as it does whole, and only
  the record's own fields go through the tokenizer.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from tune_data.dataset import TokenizedDataset
from tune_data.errors import DataError
from tune_data.sources import DataFiles, check_columns, load_records
from tune_data.templates import ALPACA, PromptTemplate, as_template, is_empty_input
from tune_data.tokenizer import Llama2Tokenizer

# Bump when the tokenisation below changes, so stale cached datasets are not reused.
_FORMAT_VERSION = "instruct-1"
_MAP_BATCH = 2048


@dataclass(frozen=True)
class _Part:
    literal: list[int] | None  # token ids of fixed template text, or
    field: str | None  # the name of a record field


def _template_parts(
    template: str, tokenizer: Llama2Tokenizer
) -> list[_Part] | None:
    """The template as pre-tokenised literals and fields, or None if it cannot be cut.

    It can be cut when every field has a newline on each side (or starts the template) and the
    template ends with a newline, where the response is appended.
    """
    if not tokenizer.splits_at_newline or not template.endswith("\n"):
        return None
    parts: list[_Part] = []
    previous = ""
    for literal, field, spec, conversion in string.Formatter().parse(template):
        if literal:
            if parts and parts[-1].field is not None and not literal.startswith("\n"):
                return None
            ids = (
                tokenizer.encode_continuations([literal])[0]
                if parts
                else tokenizer.encode(literal, add_bos=False)
            )
            parts.append(_Part(ids, None))
            previous = literal
        if field is not None:
            if spec or conversion or (parts and not previous.endswith("\n")):
                return None
            parts.append(_Part(None, field))
            previous = ""
    return parts


class _Encoder:
    """Turns a batch of records into tokens, masked prompt lengths and truncation flags."""

    def __init__(
        self,
        tokenizer: Llama2Tokenizer,
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

    def __call__(self, batch: Mapping[str, list[Any]], indices: list[int]):
        n = len(indices)
        records = [{k: _text(v[i]) for k, v in batch.items()} for i in range(n)]
        responses = [r[self.response_field] for r in records]
        if self.fast:
            prompts, answers = self._encode_by_parts(records, responses)
        else:
            prompts, answers = self._encode_whole(records, responses)
        out = _Columns()
        bos, eos, limit = self.tokenizer.bos_id, self.tokenizer.eos_id, self.max_seq_len
        for row, prompt, answer in zip(indices, prompts, answers):
            tokens = [bos, *prompt, *answer, eos]
            truncated = limit is not None and len(tokens) > limit
            if truncated:
                if len(prompt) + 1 >= limit:
                    continue  # no room for one response token: dropped, counted by describe()
                # The prompt stays whole and the response is cut. No EOS: the answer did not
                # end there, and teaching the model to stop mid-sentence is worse than not.
                tokens = tokens[:limit]
            out.add(tokens, 0 if self.train_on_input else len(prompt) + 1, row, truncated)
        return out.table()

    def _choose(self, record: Mapping[str, str]) -> bool:
        """True to use the template without input."""
        t = self.template
        return t.template_without_input is not None and is_empty_input(
            record.get(t.input_field, "")
        )

    def _encode_by_parts(
        self, records: list[dict[str, str]], responses: list[str]
    ) -> tuple[list[list[int]], list[list[int]]]:
        plans = [self.without_input if self._choose(r) else self.with_input for r in records]
        # One tokenizer call per batch for every field and response: the thread pool stays busy.
        texts: list[str] = []
        first: list[str] = []  # a field that opens the template keeps SentencePiece's "▁"
        for record, plan, response in zip(records, plans, responses):
            for i, part in enumerate(plan):
                if part.field is not None:
                    (first if i == 0 else texts).append(record[part.field])
            texts.append(response)
        encoded = iter(self.tokenizer.encode_continuations(texts))
        encoded_first = iter(self.tokenizer.encode_batch(first, add_bos=False) if first else [])
        prompts, answers = [], []
        for plan in plans:
            ids: list[int] = []
            for i, part in enumerate(plan):
                if part.literal is not None:
                    ids += part.literal
                else:
                    ids += next(encoded_first) if i == 0 else next(encoded)
            prompts.append(ids)
            answers.append(next(encoded))
        return prompts, answers

    def _encode_whole(
        self, records: list[dict[str, str]], responses: list[str]
    ) -> tuple[list[list[int]], list[list[int]]]:
        # Any template, any tokenizer: encode prompt and prompt + response whole; the prompt
        # ends where the two stop agreeing (a trailing space joins the response's first piece).
        texts = [self.template.render(r) for r in records]
        prompts = self.tokenizer.encode_batch(texts, add_bos=False)
        fulls = self.tokenizer.encode_batch(
            [t + r for t, r in zip(texts, responses)], add_bos=False
        )
        cut = [_common_prefix(p, f) for p, f in zip(prompts, fulls)]
        return [f[:c] for f, c in zip(fulls, cut)], [f[c:] for f, c in zip(fulls, cut)]


class _Columns:
    """The output columns of one map batch, handed to datasets as an Arrow table.

    Building the token column from one flat numpy array is ~30x faster than letting Arrow
    convert a Python list of lists.
    """

    def __init__(self) -> None:
        self.tokens: list[list[int]] = []
        self.prompt_len: list[int] = []
        self.rows: list[int] = []
        self.truncated: list[bool] = []

    def add(self, tokens: list[int], prompt_len: int, row: int, truncated: bool) -> None:
        self.tokens.append(tokens)
        self.prompt_len.append(prompt_len)
        self.rows.append(row)
        self.truncated.append(truncated)

    def table(self):
        import pyarrow as pa

        n = len(self.tokens)
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(np.fromiter(map(len, self.tokens), dtype=np.int32, count=n), out=offsets[1:])
        flat = np.fromiter(
            chain.from_iterable(self.tokens), dtype=np.int32, count=int(offsets[-1])
        )
        return pa.table({
            "tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
            "prompt_len": pa.array(self.prompt_len, type=pa.int32()),
            "row": pa.array(self.rows, type=pa.int64()),
            "truncated": pa.array(self.truncated, type=pa.bool_()),
        })


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def instruct_dataset(
    tokenizer: Llama2Tokenizer,
    source: str,
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
            :func:`tune_data.sources.load_records`).
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
    if max_seq_len is not None and max_seq_len < 2:
        raise DataError(f"max_seq_len must be at least 2 tokens, got {max_seq_len}")
    template = as_template(template)
    column_map = dict(column_map or {})
    fields = [*template.fields, response_field]
    records = load_records(source, data_files, split, cache_dir, **load_kwargs)
    where = _describe_source(source, data_files)
    columns = [column_map.get(f, f) for f in fields]
    check_columns(
        records, columns, where,
        hint="name your columns with column_map={'" + fields[0] + "': 'your_column', ...}",
    )
    # Rename columns to field names and drop the rest, so the encoder sees fields only.
    records = records.select_columns(columns)
    rename = {c: f for f, c in zip(fields, columns) if c != f}
    if rename:
        records = records.rename_columns(rename)
    encoder = _Encoder(tokenizer, template, response_field, train_on_input, max_seq_len)
    key = repr((
        _FORMAT_VERSION, records._fingerprint, tokenizer.fingerprint, template,
        response_field, train_on_input, max_seq_len, encoder.fast,
    ))
    tokenized = records.map(
        encoder, batched=True, with_indices=True, batch_size=_MAP_BATCH,
        remove_columns=records.column_names, features=_features(),
        new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32],
        desc=f"Tokenizing {Path(where).name if data_files else where}",
    )
    return TokenizedDataset.from_hf(
        tokenized, tokenizer=tokenizer, name=where, source_rows=len(records),
        max_seq_len=max_seq_len,
    )


def alpaca_dataset(
    tokenizer: Llama2Tokenizer,
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


def alpaca_cleaned_dataset(tokenizer: Llama2Tokenizer, **kwargs: Any) -> TokenizedDataset:
    """Alpaca with the community's fixes (``yahma/alpaca-cleaned``); see :func:`alpaca_dataset`."""
    kwargs.setdefault("source", "yahma/alpaca-cleaned")
    return alpaca_dataset(tokenizer, **kwargs)


def _describe_source(source: str, data_files: DataFiles | None) -> str:
    if data_files is None:
        return source
    if isinstance(data_files, (str, Path)):
        return str(data_files)
    return ", ".join(str(f) for f in data_files)


def _features():
    import datasets

    return datasets.Features({
        "tokens": datasets.List(datasets.Value("int32")),
        "prompt_len": datasets.Value("int32"),
        "row": datasets.Value("int64"),
        "truncated": datasets.Value("bool"),
    })
