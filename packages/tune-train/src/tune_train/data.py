"""A run's data: the training samples (and held-out validation samples), dealt to this
process as the micro-batches of each optimizer step.

``training_data(cfg, tokenizer, run)`` builds the config's dataset, holds out or builds the
validation set, packs if asked, and deals the epoch's batches to the processes;
``data.steps(epoch, start)`` yields, for every optimizer step left in the epoch, its list of
micro-batches (``gradient_accumulation_steps`` of them), each a collated batch
(tune_data's ``tokens`` / ``labels`` / ...). The epoch's order is a pure function of
(seed, epoch, world size), so a resumed run skips exactly the batches the interrupted one
had consumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from tune_train.config import TrainConfig, validation_fraction
from tune_train.errors import RecipeError


@dataclass
class TrainingData:
    """What a recipe iterates over.

    Attributes:
        dataset: The samples trained on (after the hold-out and packing).
        validation: The validation samples, or None.
        sampler: Deals each epoch's batches (``tune_data.ShardedBatchSampler``).
        collate: Sample indices -> a batch (with ``real_tokens``: the tokens that are not
            padding, for tokens/s).
        steps_per_epoch: Optimizer steps per epoch.
        accumulation: Micro-batches per optimizer step.
    """

    dataset: Any
    validation: Any
    sampler: Any
    collate: Callable[[Any], dict[str, torch.Tensor]]
    steps_per_epoch: int
    accumulation: int

    def steps(self, epoch: int, start: int = 0) -> Iterator[list[dict[str, torch.Tensor]]]:
        """The micro-batches of each optimizer step of ``epoch`` from step ``start`` on."""
        batches = iter(self.sampler.epoch_batches(epoch)[start * self.accumulation:])
        for _ in range(start, self.steps_per_epoch):
            micro = [self.collate(b) for _, b in zip(range(self.accumulation), batches)]
            if not micro:
                return
            yield micro


def training_data(cfg: TrainConfig, tokenizer: Any, run: Any) -> TrainingData:
    """The config's training (and validation) data, dealt to this process.

    Args:
        cfg: The training config.
        tokenizer: The model's tokenizer.
        run: The run (``tune_train.run.Run``): its processes, and where messages go.

    Raises:
        RecipeError: If the data cannot fill one batch, or the validation set is empty.
    """
    from tune_data import ShardedBatchSampler, check_trainable, collate, pack
    from tune_train import registry

    dataset = registry.build_dataset(cfg, tokenizer, warn=run.warn)
    check_trainable(dataset)  # no samples, or no trained token: stop before step 1
    dataset, validation = _validation_split(cfg, tokenizer, dataset, run)
    if cfg.packing:
        dataset = pack(dataset, cfg.max_seq_len, pad_id=tokenizer.pad_id)
    sampler = ShardedBatchSampler(
        dataset, cfg.batch_size, rank=run.dist.rank, world_size=run.dist.world_size,
        shuffle=cfg.shuffle, seed=cfg.seed, drop_last=True,
        group_by_length=cfg.group_by_length and not cfg.packing,
    )
    pad_id = tokenizer.pad_id
    real_lengths = getattr(dataset, "real_lengths", getattr(dataset, "lengths", None))

    def collate_indices(indices):
        batch = collate([dataset[i] for i in indices], pad_id=pad_id)
        if real_lengths is not None:
            batch["real_tokens"] = int(real_lengths[indices].sum())
        return batch

    micro_batches = len(sampler)
    if micro_batches == 0:
        raise RecipeError(
            f"{len(dataset)} samples are too few for batch_size {cfg.batch_size} on "
            f"{run.dist.world_size} process(es); lower batch_size"
        )
    steps_per_epoch = math.ceil(micro_batches / cfg.gradient_accumulation_steps)
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    return TrainingData(dataset, validation, sampler, collate_indices, steps_per_epoch,
                        cfg.gradient_accumulation_steps)


def _validation_split(cfg: TrainConfig, tokenizer: Any, dataset: Any, run: Any
                      ) -> tuple[Any, Any]:
    """(samples to train on, validation samples or None): held out of ``dataset``
    (validation_split: 0.05) or built from their own source."""
    from tune_train import registry
    from tune_train.validation import NO_TARGETS, Selection, holdout_split

    fraction = validation_fraction(cfg)
    if fraction is not None:
        train, held = holdout_split(dataset, fraction, cfg.seed)
        validation = Selection(dataset, held)
        dataset = Selection(dataset, train)
        where = f"held out of the training data ({fraction:g})"
    else:
        validation = registry.build_validation_dataset(cfg, tokenizer, warn=run.warn)
        where = "from " + (getattr(validation, "name", "") or "the validation source")
    if validation is None:
        return dataset, None
    if len(validation) == 0:
        raise RecipeError("the validation data holds no samples; check "
                          "validation_data_files / validation_dataset_source")
    targets = getattr(validation, "loss_tokens", None)
    if targets is not None and int(targets.sum()) == 0:
        raise RecipeError(NO_TARGETS)
    run.print(f"validation: {len(validation)} samples {where}")
    return dataset, validation
