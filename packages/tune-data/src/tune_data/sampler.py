"""The training sampler: shards by rank, shuffles by (seed, epoch), resumes mid-epoch exactly."""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized
from typing import Any

import numpy as np
from torch.utils.data import Sampler


class ShardedBatchSampler(Sampler):
    """Batches of sample indices for one rank, the same on every run with the same settings.

    Each epoch the indices are permuted by ``(seed, epoch)`` and cut into *global* batches of
    ``batch_size * world_size``; rank r takes the r-th ``batch_size`` slice of each. The
    order is a pure function of (seed, epoch, world_size, batch_size, lengths), which is what
    makes resuming exact.

    With ``group_by_length`` each global batch holds samples of similar length (less padding,
    which is most of the waste on CPU) and all ranks get similar lengths at each step (no rank
    waits for another). Indices are shuffled, cut into groups of ``group_size`` global
    batches, sorted by length within a group and cut into batches; the batch order is then
    shuffled, with the batch holding the longest sample moved first so that running out of
    memory happens at step 1, not hours in.

    Use as ``DataLoader(dataset, batch_sampler=sampler, collate_fn=...)``; with
    ``yield_indices=True`` it yields single indices for ``DataLoader(sampler=..., batch_size=...)``.

    Resume: ``state_dict()`` records the epoch and the samples this rank has consumed;
    ``load_state_dict()`` restores them, and the next ``set_epoch`` of that same epoch (or the
    next iteration) continues from there. Counting is by samples handed out, which is exact
    with ``num_workers=0``; a DataLoader with workers fetches ahead, so pass the training
    loop's own count: ``state_dict(batches_done=step_in_epoch)``.

    Args:
        dataset: What is sampled (its ``len``; ``lengths`` for grouping if it has them).
        batch_size: Samples per batch on each rank.
        rank: This process's rank.
        world_size: Number of ranks.
        shuffle: Permute each epoch (False: dataset order).
        seed: Base of the shuffle.
        drop_last: Drop the samples that do not fill a last global batch; False instead
            repeats samples from the epoch's start so every rank gets full batches.
        group_by_length: Batch samples of similar length together.
        lengths: Sample lengths for grouping (default: ``dataset.lengths``).
        group_size: Global batches per sorting group when grouping.
        yield_indices: Yield single indices instead of batches.

    Raises:
        ValueError: On an impossible setting (rank out of range, grouping without lengths).
    """

    def __init__(
        self,
        dataset: Sized,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        group_by_length: bool = False,
        lengths: Sequence[int] | np.ndarray | None = None,
        group_size: int = 64,
        yield_indices: bool = False,
    ):
        if batch_size < 1 or world_size < 1 or group_size < 1:
            raise ValueError("batch_size, world_size and group_size must be at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.num_samples = len(dataset)
        if group_by_length:
            lengths = lengths if lengths is not None else getattr(dataset, "lengths", None)
            if lengths is None:
                raise ValueError("group_by_length needs sample lengths: pass lengths=")
            lengths = np.asarray(lengths)
            if len(lengths) != self.num_samples:
                raise ValueError(f"{len(lengths)} lengths for {self.num_samples} samples")
        self.lengths = lengths if group_by_length else None
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.group_size = group_size
        self.yield_indices = yield_indices
        self.epoch = 0
        self._start = 0  # samples of this epoch already consumed before iterating
        self._yielded = 0  # samples handed out since then
        self._restored = False

    # -- the epoch's order -------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> np.ndarray:
        """This rank's batches of one epoch, (num_batches, batch_size) sample indices."""
        per_step = self.batch_size * self.world_size
        rng = np.random.default_rng([self.seed, epoch])
        n = self.num_samples
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.drop_last:
            order = order[: n - n % per_step]
        elif n % per_step:
            order = np.resize(order, n + per_step - n % per_step)  # wraps around
        if self.lengths is not None and len(order):
            order = self._grouped(order, rng)
        steps = order.reshape(-1, per_step)  # (num_batches, world_size * batch_size)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return steps[:, mine]

    def _grouped(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        per_step = self.batch_size * self.world_size
        group = per_step * self.group_size
        lengths = self.lengths[order]
        for start in range(0, len(order), group):
            # Longest first within a group; stable, so ties keep the shuffled order.
            by_length = np.argsort(-lengths[start : start + group], kind="stable")
            order[start : start + group] = order[start : start + group][by_length]
        steps = order.reshape(-1, per_step)  # (num_batches, world_size * batch_size)
        if self.shuffle:
            steps = steps[rng.permutation(len(steps))]
        longest = int(np.argmax(self.lengths[steps].max(axis=1)))
        steps[[0, longest]] = steps[[longest, 0]]
        return steps.reshape(-1)

    # -- iteration and resume ----------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning, or from the restored position if a state for
        this epoch was just loaded with :meth:`load_state_dict`."""
        if self._restored and epoch == self.epoch:
            return
        self.epoch, self._start, self._yielded, self._restored = epoch, 0, 0, False

    def __iter__(self) -> Iterator[Any]:
        batches = self.epoch_batches(self.epoch)
        flat = batches.reshape(-1)
        self._start, self._yielded, self._restored = self._start + self._yielded, 0, False
        if self.yield_indices:
            for index in flat[self._start :].tolist():
                self._yielded += 1
                yield index
            return
        if self._start % self.batch_size:
            raise ValueError(
                f"cannot resume batches at sample {self._start}: not a multiple of "
                f"batch_size {self.batch_size}"
            )
        for batch in batches[self._start // self.batch_size :].tolist():
            self._yielded += len(batch)
            yield batch

    def __len__(self) -> int:
        """Batches (or indices with ``yield_indices``) this rank gets in a whole epoch."""
        per_step = self.batch_size * self.world_size
        steps = self.num_samples // per_step if self.drop_last else -(-self.num_samples // per_step)
        return steps * (self.batch_size if self.yield_indices else 1)

    def state_dict(self, batches_done: int | None = None) -> dict[str, int]:
        """Where this rank is: epoch and samples consumed in it.

        Args:
            batches_done: Batches of the current epoch the training loop has consumed,
                counted from the epoch's start (default: what this sampler handed out).

        Returns:
            A dict of ints for the training state.
        """
        if batches_done is None:
            seen = self._start + self._yielded
        else:
            seen = batches_done * self.batch_size
        return {
            "epoch": self.epoch, "samples_seen": seen, "seed": self.seed,
            "batch_size": self.batch_size, "world_size": self.world_size,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where :meth:`state_dict` left off.

        Raises:
            ValueError: If the state came from a different seed, batch size, world size or
                dataset size: the order would differ, so resuming could not be exact.
        """
        for key in ("seed", "batch_size", "world_size", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the data order exactly: it was saved with {key}="
                    f"{state[key]}, now {getattr(self, key)}; resume with the same {key} "
                    "(or start the epoch over)"
                )
        self.epoch, self._start = int(state["epoch"]), int(state["samples_seen"])
        self._yielded, self._restored = 0, True
