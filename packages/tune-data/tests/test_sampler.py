"""The sampler: rank shards, (seed, epoch) shuffles, exact mid-epoch resume, length grouping."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tune_data import ShardedBatchSampler, collate


class Lengths:
    def __init__(self, lengths):
        self.lengths = np.asarray(lengths)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        n = int(self.lengths[i])
        return {"tokens": torch.full((n,), i), "labels": torch.full((n,), i)}


DATA = Lengths(np.random.default_rng(0).integers(10, 500, size=103))


def epoch(sampler, e):
    sampler.set_epoch(e)
    return list(sampler)


@pytest.mark.parametrize("group", [False, True])
def test_ranks_split_each_epoch_without_overlap(group):
    samplers = [ShardedBatchSampler(DATA, 4, rank=r, world_size=3, seed=7, group_by_length=group)
                for r in range(3)]
    per_rank = [epoch(s, 2) for s in samplers]
    assert all(len(b) == len(samplers[0]) == 103 // 12 for b in per_rank)
    flat = [i for batches in per_rank for batch in batches for i in batch]
    assert len(flat) == len(set(flat)) == 96  # 7 samples that do not fill a step are dropped
    assert epoch(samplers[0], 2) == per_rank[0]  # a pure function of (seed, epoch)
    assert epoch(samplers[0], 3) != per_rank[0]
    other_seed = ShardedBatchSampler(DATA, 4, rank=0, world_size=3, seed=8, group_by_length=group)
    assert epoch(other_seed, 2) != per_rank[0]


def test_keep_last_repeats_samples_so_every_rank_gets_full_batches():
    samplers = [ShardedBatchSampler(DATA, 4, rank=r, world_size=3, drop_last=False)
                for r in range(3)]
    per_rank = [epoch(s, 0) for s in samplers]
    assert all(len(b) == 9 and all(len(x) == 4 for x in b) for b in per_rank)
    assert {i for b in per_rank for x in b for i in x} == set(range(103))


@pytest.mark.parametrize("group", [False, True])
def test_resume_mid_epoch_continues_exactly(group):
    full = ShardedBatchSampler(DATA, 5, rank=1, world_size=2, seed=3, group_by_length=group)
    reference = epoch(full, 4)

    run = ShardedBatchSampler(DATA, 5, rank=1, world_size=2, seed=3, group_by_length=group)
    run.set_epoch(4)
    it = iter(run)
    consumed = [next(it) for _ in range(3)]
    state = run.state_dict()
    assert state["epoch"] == 4 and state["samples_seen"] == 15

    resumed = ShardedBatchSampler(DATA, 5, rank=1, world_size=2, seed=3, group_by_length=group)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # the usual loop calls this: it keeps the restored position
    assert consumed + list(resumed) == reference
    resumed.set_epoch(5)  # the next epoch starts from its beginning
    assert list(resumed) == epoch(full, 5)


def test_resume_by_index_and_with_the_loops_own_count():
    ref = ShardedBatchSampler(DATA, 4, seed=1, yield_indices=True)
    order = epoch(ref, 0)
    assert len(order) == len(ref) == 100
    sampler = ShardedBatchSampler(DATA, 4, seed=1, yield_indices=True)
    sampler.load_state_dict({"epoch": 0, "samples_seen": 37})
    assert list(sampler) == order[37:]

    batches = ShardedBatchSampler(DATA, 4, seed=1)
    list(batches)  # a DataLoader with workers would run ahead like this
    assert batches.state_dict(batches_done=6)["samples_seen"] == 24


def test_a_state_from_other_settings_is_refused():
    state = ShardedBatchSampler(DATA, 4, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size=2, now 4"):
        ShardedBatchSampler(DATA, 4, world_size=4).load_state_dict(state)


def test_length_grouping_cuts_padding_and_puts_the_longest_batch_first():
    def padding(sampler):
        waste = total = 0
        for batch in epoch(sampler, 0):
            lengths = DATA.lengths[batch]
            waste += (lengths.max() - lengths).sum()
            total += lengths.max() * len(batch)
        return waste / total

    plain = ShardedBatchSampler(DATA, 4, seed=0)
    grouped = ShardedBatchSampler(DATA, 4, seed=0, group_by_length=True)
    assert padding(grouped) < 0.1 < padding(plain)
    batches = epoch(grouped, 0)
    assert DATA.lengths[batches[0]].max() == max(DATA.lengths[b].max() for b in batches)
    # Two ranks at the same step get similar lengths (no rank waits on a longer batch).
    r0, r1 = (epoch(ShardedBatchSampler(DATA, 4, rank=r, world_size=2, group_by_length=True), 1)
              for r in (0, 1))
    for a, b in zip(r0, r1):
        assert abs(int(DATA.lengths[a].max()) - int(DATA.lengths[b].max())) < 60


def test_works_as_a_dataloader_batch_sampler():
    sampler = ShardedBatchSampler(DATA, 4, seed=0, group_by_length=True)
    loader = DataLoader(DATA, batch_sampler=sampler, collate_fn=lambda s: collate(s, pad_id=0))
    batches = list(loader)
    assert len(batches) == len(sampler) == 25
    assert sampler.state_dict()["samples_seen"] == 100
    assert all(b["tokens"].shape[0] == 4 for b in batches)


def test_bad_settings():
    with pytest.raises(ValueError, match="rank 2 is outside"):
        ShardedBatchSampler(DATA, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="needs sample lengths"):
        ShardedBatchSampler(list(range(10)), 4, group_by_length=True)
