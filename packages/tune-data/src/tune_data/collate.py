"""Collate samples into the Batch contract: pad to the longest, labels -100 on padding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tune_data.dataset import IGNORE_INDEX


def collate(samples: Sequence[Mapping[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack samples into one batch, right-padded to the longest sample.

    Plain samples give ``tokens`` and ``labels`` (B, T) int64. Packed samples (with
    ``input_pos``) also give ``input_pos`` (B, T) and a block-diagonal causal ``mask``
    (B, T, T) bool, True where a position may attend: a token sees only earlier tokens of its
    own document, so ``model(tokens, input_pos=input_pos, mask=mask, labels=labels)`` treats
    every document as if it were alone.

    Args:
        samples: Dicts with ``tokens`` and ``labels`` (and ``input_pos`` when packed), each a
            1-D tensor or list of ints.
        pad_id: Token id for padding (its labels are -100, so any valid id works).

    Returns:
        The batch.

    Raises:
        ValueError: If there are no samples or a sample's tokens and labels differ in length.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    tokens = [torch.as_tensor(s["tokens"], dtype=torch.long) for s in samples]
    labels = [torch.as_tensor(s["labels"], dtype=torch.long) for s in samples]
    for i, (t, lab) in enumerate(zip(tokens, labels)):
        if t.shape != lab.shape:
            raise ValueError(f"sample {i}: tokens {tuple(t.shape)} and labels {tuple(lab.shape)}")
    width = max(len(t) for t in tokens)
    batch = {
        "tokens": _pad(tokens, width, pad_id),
        "labels": _pad(labels, width, IGNORE_INDEX),
    }
    if "input_pos" in samples[0]:
        rows = []
        for s in samples:
            pos = torch.as_tensor(s["input_pos"], dtype=torch.long)
            # Padding becomes one more document (positions 0, 1, ...): it attends only to
            # itself, so no row of the mask is empty (an empty row makes attention NaN).
            rows.append(torch.cat([pos, torch.arange(width - len(pos))]) if len(pos) < width
                        else pos)
        input_pos = torch.stack(rows)  # (B, T)
        batch["input_pos"] = input_pos
        batch["mask"] = document_mask(input_pos)
    return batch


def document_mask(input_pos: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask of packed rows; a document starts where input_pos is 0.

    Args:
        input_pos: (B, T) per-document positions.

    Returns:
        (B, T, T) bool, True where query position i may attend to key position j.
    """
    doc = (input_pos == 0).cumsum(dim=1)  # (B, T): document number of each position
    t = input_pos.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=input_pos.device).tril()  # (T, T)
    return (doc[:, :, None] == doc[:, None, :]) & causal  # (B, T, T)


def _pad(rows: list[torch.Tensor], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
