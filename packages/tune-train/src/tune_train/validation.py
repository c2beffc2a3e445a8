"""Validation during training: the held-out data, its batches on each process, and the loss.

A recipe calls three things: :func:`holdout_split` (when ``validation_split`` is a fraction)
carves validation records out of the training set, :func:`validation_batches` deals the
validation set to the processes, and :func:`validation_loss` runs it through the model and
returns the loss per target token over every process — the quantity training logs as
``loss``, on data the model never trains on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tune_data import IGNORE_INDEX
from tune_train.distributed import all_reduce_sum
from tune_train.errors import RecipeError

# Second word of the hold-out's random stream: the sampler draws its epoch orders from
# [seed, epoch], so the split never shares numbers with any epoch's shuffle.
_HOLDOUT_STREAM = 0x7A11D

NO_TARGETS = ("the validation data has no tokens to score (every label is masked); check "
              "validation_split / validation_data_files")


class Selection(torch.utils.data.Dataset):
    """Some samples of a dataset, in the given order: ``selection[i]`` is
    ``dataset[indices[i]]``. Carries the ``lengths`` (and ``loss_tokens``) that length
    grouping, packing and the checks here read.

    Args:
        dataset: A dataset of samples (e.g. a ``tune_data.TokenizedDataset``).
        indices: The samples to keep.
    """

    def __init__(self, dataset: Any, indices: Sequence[int] | np.ndarray):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.tokenizer = getattr(dataset, "tokenizer", None)
        self.name = getattr(dataset, "name", "")
        self.lengths = self._pick(getattr(dataset, "lengths", None))
        self.loss_tokens = self._pick(getattr(dataset, "loss_tokens", None))

    def _pick(self, values: Sequence[int] | np.ndarray | None) -> np.ndarray | None:
        return None if values is None else np.asarray(values)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.dataset[int(self.indices[index])]

    def __repr__(self) -> str:
        return f"Selection({self.dataset!r}, samples={len(self)})"


def holdout_split(dataset: Any, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a dataset's samples into training and validation, by seed, without leaks.

    Whole source records are held out (every sample of a record goes the same way, so no
    text of a validation record is trained on). A source with too few records to hold out
    ``round(fraction * records)`` of them, at least one and not all (one book cut into
    chunks), is split by samples instead: the chunks of a document are disjoint text.

    Args:
        dataset: The training samples; its ``rows`` (the source record of each sample) are
            used when it has them.
        fraction: Share to hold out, in (0, 1).
        seed: The run's seed: the same seed and data give the same split.

    Returns:
        ``(train, validation)`` sample indices, each in dataset order.

    Raises:
        RecipeError: If the dataset is too small to hold anything out.
    """
    n = len(dataset)
    rows = getattr(dataset, "rows", None)
    units = np.asarray(rows) if rows is not None else np.arange(n)
    names = np.unique(units)
    rng = np.random.default_rng([seed, _HOLDOUT_STREAM])
    held = round(fraction * len(names))
    if not 1 <= held < len(names):
        units, names = np.arange(n), np.arange(n)  # too few records: hold out samples
        held = round(fraction * n)
    if not 1 <= held < n:
        raise RecipeError(f"validation_split {fraction} of {n} training samples holds out "
                          f"{'none' if held < 1 else 'all'} of them; choose a fraction that "
                          "leaves both sets some samples, or point validation_data_files at "
                          "separate data")
    mask = np.isin(units, rng.permutation(names)[:held])
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def validation_batches(num_samples: int, batch_size: int, *, rank: int = 0,
                       world_size: int = 1, max_batches: int | None = None,
                       lengths: Sequence[int] | np.ndarray | None = None) -> list[np.ndarray]:
    """This process's share of the validation samples, as batches of indices.

    Every sample (of the first ``max_batches * batch_size * world_size``) is in exactly one
    batch of one process, so the loss summed over processes is the loss of the whole set
    however many there are. Every process gets the same number of batches (FSDP gathers
    parameters in every forward, so all processes must run each one); where the samples run
    out, a process's batch is empty. Samples are sorted by length first (less padding).

    Args:
        num_samples: Size of the validation set.
        batch_size: Samples per batch on each process.
        rank: This process.
        world_size: Number of processes.
        max_batches: Batches per process at most (None: the whole set).
        lengths: Sample lengths, to batch similar lengths together.

    Returns:
        One int64 index array per batch, possibly empty.
    """
    per_step = batch_size * world_size
    steps = math.ceil(num_samples / per_step)
    if max_batches is not None:
        steps = min(steps, max_batches)
    order = np.arange(min(num_samples, steps * per_step))
    if lengths is not None:
        # Longest first: a batch that does not fit in memory fails at once.
        order = order[np.argsort(-np.asarray(lengths)[order], kind="stable")]
    return [order[s * per_step:(s + 1) * per_step][rank * batch_size:(rank + 1) * batch_size]
            for s in range(steps)]


def collated(dataset: Any, batches: Iterable[np.ndarray],
             collate: Callable[[list[Any]], dict[str, torch.Tensor]]
             ) -> Iterator[dict[str, torch.Tensor]]:
    """The batches as model inputs. An empty batch becomes one sample with no targets, so a
    process without samples still runs the forward pass the others wait on (FSDP) and adds
    nothing to the loss."""
    for indices in batches:
        if len(indices):
            yield collate([dataset[int(i)] for i in indices])
        else:
            batch = collate([dataset[0]])
            batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
            yield batch


@dataclass(frozen=True)
class ValidationResult:
    """The validation loss of one evaluation.

    Attributes:
        loss: Mean cross-entropy per target token over all processes, in nats.
        num_tokens: Target tokens scored, over all processes.
    """

    loss: float
    num_tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf  # exp overflows past ~709

    def metrics(self) -> dict[str, float]:
        """What the metric loggers record."""
        return {"val_loss": self.loss, "val_perplexity": self.perplexity}


@torch.no_grad()
def validation_loss(model: torch.nn.Module,
                    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor],
                    batches: Iterable[dict[str, torch.Tensor]], device: torch.device,
                    autocast: AbstractContextManager | None = None,
                    on_batch: Callable[[], None] | None = None) -> ValidationResult:
    """Loss per target token over this process's batches and every other process's.

    The model runs in evaluation mode without gradients and is put back as it was. Losses
    are summed per token in fp64 and divided by the target tokens once, after summing over
    processes: a token weighs the same in a short batch as in a long one, on any process.

    Args:
        model: The model (sharded or not).
        loss_fn: ``loss_fn(model, batch)`` -> summed token loss (training's loss).
        batches: This process's batches (:func:`collated`).
        device: Where the model runs.
        autocast: The training forward's autocast context, if any.
        on_batch: Called after each batch (progress).

    Returns:
        The loss over all processes.

    Raises:
        RecipeError: If there is no target token to score anywhere.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, target tokens)
    try:
        for batch in batches:
            tokens = int((batch["labels"] != IGNORE_INDEX).sum())
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast or nullcontext():
                loss = loss_fn(model, batch)
            total[0] += loss.double()
            total[1] += tokens
            if on_batch is not None:
                on_batch()
    finally:
        model.train(was_training)
    loss_sum, num_tokens = all_reduce_sum(total).tolist()
    if num_tokens == 0:
        raise RecipeError(NO_TARGETS)
    return ValidationResult(loss=loss_sum / num_tokens, num_tokens=int(num_tokens))


def validation_due(*, global_step: int, step_in_epoch: int, steps_per_epoch: int,
                   every: int | None) -> bool:
    """Whether to validate after this step: every ``every`` steps and at each epoch's end.

    A pure function of the step, so a resumed run validates where an uninterrupted one did
    (before the step's checkpoint, which then records the best so far).
    """
    return step_in_epoch >= steps_per_epoch or (every is not None and global_step % every == 0)


def validate(model: torch.nn.Module,
             loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor],
             dataset: Any, run: Any, *, batch_size: int, pad_id: int,
             max_batches: int | None, step: int) -> ValidationResult:
    """The validation loss of the model as it is now, each process scoring its share, with a
    progress bar.

    Args:
        model: The model (sharded or not).
        loss_fn: Training's loss (summed token losses).
        dataset: The validation samples.
        run: The run (``tune_train.run.Run``): its processes, device and forward context.
        batch_size: Samples per batch on each process.
        pad_id: The tokenizer's padding id.
        max_batches: At most this many batches per process (None: all).
        step: The step validated after, for the progress bar.
    """
    from functools import partial

    from tune_data import collate
    from tune_train.metrics import StepProgress

    batches = validation_batches(
        len(dataset), batch_size, rank=run.dist.rank, world_size=run.dist.world_size,
        max_batches=max_batches, lengths=getattr(dataset, "lengths", None))
    progress = StepProgress(len(batches), 0, f"validation at step {step}", show=run.is_main,
                            unit="batch", leave=False)
    try:
        return validation_loss(model, loss_fn,
                               collated(dataset, batches, partial(collate, pad_id=pad_id)),
                               run.device, run.autocast(), on_batch=progress.update)
    finally:
        progress.close()
