"""What a user should see before training: dataset statistics and one sample with its mask."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import Dataset

from tune_data.dataset import IGNORE_INDEX, ROLES, TokenizedDataset
from tune_data.errors import DataError
from tune_data.packing import PackedDataset
from tune_data.tokenizers import Tokenizer


@dataclass
class DataStats:
    """Counts and lengths of a tokenized (or packed) dataset; ``str()`` is a short report.

    ``dropped`` records are in the source but not in the dataset (a prompt with no room for a
    response, an empty document); ``truncated`` samples were cut to ``max_seq_len``;
    ``no_loss`` samples have no target at all and only cost compute.
    """

    name: str
    source_rows: int
    samples: int
    dropped: int
    truncated: int
    no_loss: int
    tokens: int
    loss_tokens: int
    max_seq_len: int | None
    length_min: int = 0
    length_median: float = 0.0
    length_mean: float = 0.0
    length_p95: float = 0.0
    length_max: int = 0
    dropped_rows: list[int] = field(default_factory=list)  # first few, counting from 0
    truncated_rows: list[int] = field(default_factory=list)
    no_loss_rows: list[int] = field(default_factory=list)
    padding: dict[int, float] = field(default_factory=dict)  # batch size -> padded fraction
    packed_rows: int | None = None
    packed_fill: float | None = None
    turns: dict[int, int] | None = None  # chat: conversations by number of turns kept
    assistant_turns: int | None = None  # chat: assistant turns kept (trained, whole or cut)

    @property
    def warnings(self) -> list[str]:
        """Problems worth fixing before training, one line each."""
        out = []
        if self.samples == 0 and self.source_rows:
            out.append(f"no samples: {_all_dropped(self.source_rows, self.max_seq_len)}")
        if self.dropped and self.samples:
            out.append(
                f"{self.dropped} record(s) dropped (prompt leaves no room for a response, or "
                f"empty), rows {_rows(self.dropped_rows, self.dropped)}; raise max_seq_len "
                "to keep them"
            )
        if self.truncated:
            out.append(
                f"{self.truncated} sample(s) truncated to {self.max_seq_len} tokens, rows "
                f"{_rows(self.truncated_rows, self.truncated)}"
            )
        if self.no_loss:
            out.append(
                f"{self.no_loss} sample(s) have no loss tokens after masking and truncation, "
                f"rows {_rows(self.no_loss_rows, self.no_loss)}: they cost compute and teach "
                "nothing"
            )
        return out

    def __str__(self) -> str:
        lines = [
            f"{self.name}: {self.samples:,} samples from {self.source_rows:,} records",
            f"  tokens {self.tokens:,}, with loss {self.loss_tokens:,} "
            f"({self.loss_tokens / max(self.tokens, 1):.0%})",
            f"  length min {self.length_min}, median {self.length_median:.0f}, mean "
            f"{self.length_mean:.0f}, p95 {self.length_p95:.0f}, max {self.length_max}"
            + (f" (max_seq_len {self.max_seq_len})" if self.max_seq_len else ""),
        ]
        if self.turns is not None:
            lines.append(f"  turns per conversation: {_histogram(self.turns)}; "
                         f"{self.assistant_turns:,} assistant turns")
        for batch_size, waste in self.padding.items():
            lines.append(f"  padding at batch size {batch_size}: {waste:.0%} of tokens")
        if self.packed_rows is not None:
            lines.append(f"  packed into {self.packed_rows:,} rows, {self.packed_fill:.1%} full")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _all_dropped(records: int, max_seq_len: int | None) -> str:
    """Why a dataset of ``records`` records holds no sample, and what to do."""
    if max_seq_len is None:
        return f"all {records:,} records were dropped as empty; check the data"
    return (f"all {records:,} records were dropped: a record is dropped when none of its trained "
            f"tokens fit in max_seq_len {max_seq_len} (a long prompt, or long turns before the "
            "first answer) or when it is empty; raise max_seq_len or check the data")


def _name(dataset: Dataset) -> str:
    return getattr(dataset, "name", "") or "the dataset"


def check_trainable(dataset: Dataset) -> None:
    """Refuse a dataset a run could not learn from: no samples, or no trained token at all.

    Such a run would stop at its first batch, or train at loss 0 with no gradient and exit
    as if it had worked. A dataset that does not count its trained tokens (no
    ``loss_tokens``) is not checked.

    Args:
        dataset: A :class:`TokenizedDataset` (or any dataset with ``loss_tokens``).

    Raises:
        DataError: One line saying which, and the likely reason.
    """
    loss = getattr(dataset, "loss_tokens", None)
    if loss is None:
        return
    name = _name(dataset)
    if len(dataset) == 0:
        records = getattr(dataset, "source_rows", 0)
        if not records:
            raise DataError(f"{name} holds no records; check the data files or source")
        raise DataError(f"{name}: {_all_dropped(records, getattr(dataset, 'max_seq_len', None))}")
    if int(np.asarray(loss).sum()) > 0:
        return
    lengths = getattr(dataset, "lengths", None)
    empty = lengths is not None and int(np.asarray(lengths).sum()) == 0
    turns = getattr(dataset, "turns", None)
    if turns is not None and empty:
        why = "its chat template renders nothing for every conversation; check the template"
    elif turns is not None:
        why = ("its chat template renders no assistant answer in any conversation (or the "
               "conversations have no assistant messages); check the template and the roles")
    elif empty:
        why = "every sample is empty"
    else:
        why = "every token is masked from the loss (no responses to train on?)"
    raise DataError(f"{name}: none of its {len(dataset):,} samples has a trained token, so "
                    f"a run would learn nothing (loss 0): {why}")


def _histogram(counts: dict[int, int]) -> str:
    """``2 (167), 4 (166)`` for a few distinct values, else the range and median."""
    if len(counts) <= 6:
        return ", ".join(f"{k} ({v:,})" for k, v in sorted(counts.items()))
    values = np.repeat(list(counts), list(counts.values()))
    return f"min {values.min()}, median {np.median(values):.0f}, max {values.max()}"


def _rows(rows: list[int], total: int) -> str:
    shown = ", ".join(str(r) for r in rows)
    return shown + (", ..." if total > len(rows) else "")


_SHOW_ROWS = 5


def describe(dataset: Dataset, batch_sizes: tuple[int, ...] = ()) -> DataStats:
    """Statistics of a :class:`TokenizedDataset` or :class:`PackedDataset`.

    Args:
        dataset: The dataset.
        batch_sizes: Also estimate the share of padding when batching randomly at these sizes.

    Returns:
        The statistics; ``print(stats)`` shows them with warnings.
    """
    packed = dataset if isinstance(dataset, PackedDataset) else None
    base = packed.dataset if packed is not None else dataset
    if not isinstance(base, TokenizedDataset):
        raise TypeError(f"describe() needs a TokenizedDataset or PackedDataset, got {type(base)}")
    lengths, loss = base.lengths, base.loss_tokens
    dropped_rows = np.setdiff1d(np.arange(base.source_rows), base.rows)
    no_loss = np.flatnonzero(loss == 0)
    stats = DataStats(
        name=base.name or type(base).__name__,
        source_rows=base.source_rows,
        samples=len(base),
        dropped=len(dropped_rows),
        truncated=int(base.truncated.sum()),
        no_loss=len(no_loss),
        tokens=int(lengths.sum()),
        loss_tokens=int(loss.sum()),
        max_seq_len=base.max_seq_len,
        dropped_rows=dropped_rows[:_SHOW_ROWS].tolist(),
        truncated_rows=base.rows[base.truncated][:_SHOW_ROWS].tolist(),
        no_loss_rows=base.rows[no_loss][:_SHOW_ROWS].tolist(),
    )
    if len(lengths):
        stats.length_min, stats.length_max = int(lengths.min()), int(lengths.max())
        stats.length_median = float(np.median(lengths))
        stats.length_mean = float(lengths.mean())
        stats.length_p95 = float(np.percentile(lengths, 95))
    rng = np.random.default_rng(0)
    for batch_size in batch_sizes:
        n = len(lengths) - len(lengths) % batch_size
        if n:
            batches = lengths[rng.permutation(len(lengths))[:n]].reshape(-1, batch_size)
            padded = batches.max(axis=1).sum() * batch_size
            stats.padding[batch_size] = 1 - batches.sum() / padded
    if packed is not None:
        stats.packed_rows, stats.packed_fill = len(packed), packed.fill
    if base.turns is not None:
        # Turns are user and assistant messages; a system prompt is not one.
        roles = base.turns.roles
        owner = np.repeat(np.arange(len(base)), base.turns.counts)
        per_sample = np.bincount(owner[roles != ROLES.index("system")], minlength=len(base))
        values, counts = np.unique(per_sample, return_counts=True)
        stats.turns = dict(zip(values.tolist(), counts.tolist()))
        stats.assistant_turns = int((roles == ROLES.index("assistant")).sum())
    return stats


def render_sample(
    dataset: Dataset,
    index: int,
    tokenizer: Tokenizer | None = None,
    *,
    color: bool = False,
    show_ids: bool = False,
) -> str:
    """One sample decoded, with the text that takes no loss marked.

    A token takes loss when it is the target of the position before it. Masked text is dimmed
    (``color=True``, ANSI) or wrapped in ``⟦ ⟧``; special tokens show by name (``<s>``,
    ``<|eot_id|>``); each message of a conversation (chat datasets) starts on a ``── role ──``
    line, each document of a packed row on a ``── document ──`` line, and a packed row's
    padding is counted last.

    Args:
        dataset: A TokenizedDataset, PackedDataset, or any dataset of ``tokens``/``labels``.
        index: Which sample (row, when packed).
        tokenizer: To decode; default: the dataset's.
        color: Dim masked text with ANSI codes instead of brackets.
        show_ids: Append a table of position, token id, piece and target.

    Returns:
        The text to print.

    Raises:
        DataError: If there is no such sample (for an empty dataset: why it is empty).
    """
    tokenizer = tokenizer or getattr(dataset, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("render_sample needs a tokenizer to decode")
    if len(dataset) == 0:
        check_trainable(dataset)  # says why it is empty
        raise DataError(f"{_name(dataset)} holds no samples")
    if not -len(dataset) <= index < len(dataset):
        raise DataError(f"there is no sample {index}: {_name(dataset)} holds {len(dataset):,} "
                        f"(0 to {len(dataset) - 1:,})")
    sample = dataset[index]
    tokens = [int(t) for t in sample["tokens"]]
    labels = [int(t) for t in sample["labels"]]
    positions = sample.get("input_pos")
    trained = [False] + [lab != IGNORE_INDEX for lab in labels[:-1]]  # token j is a target?
    # Lines that open a part of the sample: a document of a packed row, a message.
    breaks: dict[int, str] = {}
    if positions is not None:
        breaks = {j: "document" for j, p in enumerate(positions) if int(p) == 0 and j}
    turns = getattr(dataset, "turns", None)
    if turns is not None:
        messages = turns.of(index if index >= 0 else index + len(dataset))
        breaks.update(messages)
    pad_from = _padding_start(tokens, labels, tokenizer.pad_id, positions)
    dim_on, dim_off = ("\x1b[2m", "\x1b[0m") if color else ("⟦", "⟧")

    pieces: list[tuple[str, bool | None]] = []  # (text, masked); None: a line of ours
    span: list[int] = []  # ids of the current run of ordinary tokens
    masked = False
    text_start = True  # some tokenizers drop a text's leading space; mid-text it is real
    names = {i: name for name, i in tokenizer.special_tokens.items()}

    def flush() -> None:
        nonlocal text_start
        if span:
            decode = tokenizer.decode if text_start else tokenizer.decode_continuation
            pieces.append((decode(span), masked))
            span.clear()
            text_start = False

    for j, tok in enumerate(tokens[:pad_from]):
        special = names.get(tok)
        if j in breaks:
            flush()
            pieces.append((f"── {breaks[j]} ──\n", None))
            text_start = breaks[j] == "document"
        if special is not None or (not trained[j]) != masked:
            flush()
            masked = not trained[j]
        if special is not None:
            pieces.append((special, masked))
            text_start = tok == tokenizer.bos_id
        else:
            span.append(tok)
    flush()
    if pad_from < len(tokens):
        pieces.append((f"── {len(tokens) - pad_from} padding tokens ──", None))
    # Adjacent runs with the same state share one pair of marks; our lines start a line.
    merged: list[tuple[str, bool | None]] = []
    for text, is_masked in pieces:
        if is_masked is None and merged and not merged[-1][0].endswith("\n"):
            text = "\n" + text
        if merged and merged[-1][1] == is_masked and is_masked is not None:
            merged[-1] = (merged[-1][0] + text, is_masked)
        else:
            merged.append((text, is_masked))
    text = "".join(dim_on + t + dim_off if m else t for t, m in merged)
    n_loss = sum(trained)
    header = (
        f"sample {index}: {len(tokens)} tokens, {n_loss} with loss"
        + (f", {len(messages)} messages" if turns is not None else "")
        + ("" if color else "; text in ⟦ ⟧ takes no loss")
    )
    out = [header, text]
    if show_ids:
        out.append(f"{'pos':>5} {'id':>6}  {'piece':<16} target")
        for j, (tok, lab) in enumerate(zip(tokens, labels)):
            target = "-" if lab == IGNORE_INDEX else f"{lab} {tokenizer.id_to_piece(lab)!r}"
            out.append(f"{j:>5} {tok:>6}  {tokenizer.id_to_piece(tok)!r:<16} {target}")
    return "\n".join(out)


def _padding_start(tokens, labels, pad_id, positions) -> int:
    """First position of the padding tail of a packed row (len(tokens) if none)."""
    if positions is None:
        return len(tokens)
    last_doc = max(j for j, p in enumerate(positions) if int(p) == 0)
    tail = range(last_doc, len(tokens))
    if last_doc and all(tokens[j] == pad_id and labels[j] == IGNORE_INDEX for j in tail):
        return last_doc
    return len(tokens)
