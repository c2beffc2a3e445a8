"""Collate (pad to the longest) and packing (rows of max_seq_len, block-diagonal mask)."""

import numpy as np
import pytest
import torch

from tune_data import IGNORE_INDEX, TokenizedDataset, collate, document_mask, pack, plan_rows
from tune_data.dataset import prefix_mask


def handmade(lengths, prompt_len=2):
    """A TokenizedDataset whose sample i holds tokens 100*i+1, 100*i+2, ..."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.concatenate([100 * i + 1 + np.arange(n) for i, n in enumerate(lengths)])
    n = len(lengths)
    prompt_len = np.broadcast_to(prompt_len, (n,)).copy()
    return TokenizedDataset(
        tokens.astype(np.int32), offsets, prefix_mask(offsets, prompt_len), np.arange(n),
        np.zeros(n, bool),
    )


def test_collate_pads_to_the_longest_with_ignored_labels():
    ds = handmade([3, 5])
    batch = collate([ds[0], ds[1]], pad_id=0)
    assert set(batch) == {"tokens", "labels"}
    assert batch["tokens"].dtype == torch.long and batch["tokens"].shape == (2, 5)
    assert batch["tokens"][0].tolist() == [1, 2, 3, 0, 0]
    # prompt_len 2: tokens[0..1] are never targets, so labels start at position 1.
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 3, IGNORE_INDEX, IGNORE_INDEX,
                                           IGNORE_INDEX]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 103, 104, 105, IGNORE_INDEX]
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_plan_rows_places_every_sample_once_and_fills_rows():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 300, size=2000)
    rows = plan_rows(lengths, 512)
    placed = np.sort(np.concatenate([np.array(r) for r in rows]))
    assert np.array_equal(placed, np.arange(2000))
    assert all(lengths[r].sum() <= 512 for r in rows)
    assert lengths.sum() / (len(rows) * 512) > 0.97  # in-order filling gets ~0.8 here
    assert plan_rows(lengths, 512) == rows  # deterministic: every rank plans the same
    with pytest.raises(ValueError, match="does not fit"):
        plan_rows([600], 512)


def test_packed_rows_keep_documents_apart():
    ds = handmade([6, 4, 3, 9])
    packed = pack(ds, max_seq_len=10, pad_id=0)
    assert packed.truncated == 0 and packed.dropped == 0
    rows = [packed[i] for i in range(len(packed))]
    assert all(len(r["tokens"]) == 10 for r in rows)
    # Every sample appears whole in exactly one row, positions restarting at 0.
    seen = {}
    for row in rows:
        pos = row["input_pos"].tolist()
        starts = [j for j, p in enumerate(pos) if p == 0] + [10]
        for a, b in zip(starts, starts[1:]):
            first = int(row["tokens"][a])
            if first == 0:
                assert (row["labels"][a:b] == IGNORE_INDEX).all()  # padding
                continue
            seen[first // 100] = row["tokens"][a:b].tolist()
            assert row["labels"][a:b].tolist() == ds[first // 100]["labels"].tolist()
    assert seen == {i: ds[i]["tokens"].tolist() for i in range(4)}

    batch = collate(rows, pad_id=0)
    assert batch["mask"].shape == (len(rows), 10, 10) and batch["mask"].dtype == torch.bool
    assert torch.equal(batch["mask"], document_mask(batch["input_pos"]))


def test_document_mask_is_block_diagonal_causal():
    mask = document_mask(torch.tensor([[0, 1, 2, 0, 1, 0]]))[0].int()
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ])
    assert torch.equal(mask, expected)


def test_packing_cuts_samples_longer_than_a_row_and_drops_those_left_without_loss():
    ds = handmade([12, 5, 8], prompt_len=[2, 2, 8])  # sample 2: all prompt
    packed = pack(ds, max_seq_len=7)
    assert packed.truncated == 1 and packed.dropped == 1
    assert packed.samples.tolist() == [0, 1]
    long = next(packed[i] for i in range(len(packed)) if packed[i]["tokens"][0] == 1)
    assert long["tokens"].tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert long["labels"].tolist() == [IGNORE_INDEX, 3, 4, 5, 6, 7, IGNORE_INDEX]


def test_real_alpaca_packs_densely(alpaca):
    packed = pack(alpaca, max_seq_len=512)
    assert sorted(packed.samples.tolist()) == list(range(len(alpaca)))
    assert packed.fill > 0.97
    batch = collate([packed[0], packed[1]], pad_id=0)
    assert batch["tokens"].shape == (2, 512) and batch["mask"].shape == (2, 512, 512)
    assert (batch["labels"] != IGNORE_INDEX).sum() == sum(
        int(alpaca.loss_tokens[i]) for r in (0, 1) for i in packed.bins[r]
    )


def test_several_trained_spans_survive_collate_and_packing():
    # A conversation-like sample: tokens 1-3 and 6-7 are targets, 4-5 are not.
    tokens = np.arange(1, 9, dtype=np.int32)
    trained = np.array([0, 1, 1, 1, 0, 0, 1, 1], dtype=bool)
    offsets = np.array([0, 8])
    ds = TokenizedDataset(tokens, offsets, trained, np.arange(1), np.zeros(1, bool))
    expected = [2, 3, 4, IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX]
    assert ds[0]["labels"].tolist() == expected and ds.loss_tokens.tolist() == [5]
    assert collate([ds[0]])["labels"][0].tolist() == expected
    packed = pack(ds, max_seq_len=10, pad_id=0)
    assert packed[0]["labels"].tolist() == expected + [IGNORE_INDEX] * 2
