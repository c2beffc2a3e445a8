"""The progress of a training run: what ``trainer_state.json`` in every checkpoint holds.

One dataclass is the schema: the recipe keeps its counters in it, a checkpoint writes it, and
reading it back checks every field (a checkpoint may come from a shared drive or a download,
so the file is untrusted input). Model weights, optimizer state and RNG states are written
beside it by :mod:`tune_train.checkpointing`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tune_ckpt import CheckpointError

TRAINER_STATE = "trainer_state.json"


class DamagedCheckpointError(CheckpointError):
    """A file of a checkpoint is missing, truncated, corrupt, or holds what tune never writes.

    The message names the file (relative to the checkpoint folder where that is clear).
    """


def _count(least: int) -> Any:
    return field(default=least, metadata={"least": least})


@dataclass
class TrainingState:
    """Counters and settings a run needs to continue exactly where it stopped.

    Attributes:
        recipe: The recipe that wrote it (full_finetune, lora_finetune, ...): a checkpoint is
            resumed by the recipe that made it. None in checkpoints of tune before it was
            recorded (the files of the checkpoint tell then, see :func:`recipe_of`).
        global_step: Optimizer steps taken.
        epoch: The epoch in progress (0-based).
        step_in_epoch: Optimizer steps taken in that epoch.
        world_size: Processes of the run that saved it.
        batch_size: Samples per micro-batch on each process.
        gradient_accumulation_steps: Micro-batches per optimizer step.
        loss_scaler: fp16's loss scaler (``{"scale", "good_steps"}``), else None.
        best_val_loss: The lowest validation loss so far (save_best), else None.
        best_val_step: The step it was measured at.
    """

    recipe: str | None = None
    global_step: int = _count(0)
    epoch: int = _count(0)
    step_in_epoch: int = _count(0)
    world_size: int = _count(1)
    batch_size: int = _count(1)
    gradient_accumulation_steps: int = _count(1)
    loss_scaler: dict[str, float] | None = None
    best_val_loss: float | None = None
    best_val_step: int | None = None

    def improves(self, val_loss: float) -> bool:
        """Whether a validation loss is the lowest so far (save_best keeps that model)."""
        return math.isfinite(val_loss) and (self.best_val_loss is None
                                            or val_loss < self.best_val_loss)

    def note_best(self, best: dict[str, Any] | None) -> None:
        """Adopt what ``checkpoints/best`` says (step, val_loss) when it is better than what
        this state knows: a run killed after saving a best model but before its next
        checkpoint resumes from a state that predates that best."""
        if best is not None and (self.best_val_loss is None
                                 or best["val_loss"] < self.best_val_loss):
            self.best_val_step, self.best_val_loss = best["step"], best["val_loss"]

    def step_done(self) -> None:
        self.global_step += 1
        self.step_in_epoch += 1

    def epoch_done(self) -> None:
        self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def resumed(self, saved: TrainingState, steps_per_epoch: int) -> TrainingState:
        """This run's state (recipe, processes, batch settings) continuing ``saved``'s
        progress. When the global batch changed, the fraction of the epoch already seen is
        kept."""
        state = replace(saved, recipe=self.recipe, world_size=self.world_size,
                        batch_size=self.batch_size,
                        gradient_accumulation_steps=self.gradient_accumulation_steps)
        old_global = saved.world_size * saved.batch_size
        new_global = self.world_size * self.batch_size
        if old_global != new_global:
            state.step_in_epoch = saved.step_in_epoch * old_global // new_global
        if state.step_in_epoch >= steps_per_epoch:
            state.epoch_done()
        return state

    def write(self, folder: Path) -> None:
        (Path(folder) / TRAINER_STATE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, checkpoint: Path) -> TrainingState:
        """A checkpoint's trainer_state.json, every field checked for type and range.

        Raises:
            DamagedCheckpointError: If it is missing, not JSON, or a field is missing or
                wrong.
        """
        path = Path(checkpoint) / TRAINER_STATE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise DamagedCheckpointError(f"{TRAINER_STATE} is missing") from e
        except (ValueError, UnicodeDecodeError) as e:
            raise DamagedCheckpointError(f"{TRAINER_STATE} is not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise DamagedCheckpointError(f"{TRAINER_STATE} holds a {type(data).__name__}, not "
                                         "an object of training progress")
        for f in fields(cls):
            if "least" in f.metadata:
                _check_count(data, f.name, f.metadata["least"])
        state = cls(**{f.name: data.get(f.name) for f in fields(cls) if f.name in data})
        state._check(Path(checkpoint))
        return state

    def _check(self, checkpoint: Path) -> None:
        if self.recipe is not None and not isinstance(self.recipe, str):
            raise DamagedCheckpointError(f"{TRAINER_STATE}: 'recipe' is {self.recipe!r}, "
                                         "expected a recipe name")
        step = step_of(checkpoint)
        if step >= 0 and self.global_step != step:
            raise DamagedCheckpointError(f"{TRAINER_STATE}: 'global_step' is {self.global_step} "
                                         f"but the folder is {checkpoint.name}")
        if self.step_in_epoch > self.global_step:
            raise DamagedCheckpointError(f"{TRAINER_STATE}: 'step_in_epoch' "
                                         f"({self.step_in_epoch}) exceeds 'global_step' "
                                         f"({self.global_step})")
        self._check_best()
        scaler = self.loss_scaler
        if scaler is not None:
            scale = scaler.get("scale") if isinstance(scaler, dict) else None
            good = scaler.get("good_steps") if isinstance(scaler, dict) else None
            if (not _is_number(scale) or not math.isfinite(scale) or scale <= 0
                    or isinstance(good, bool) or not isinstance(good, int) or good < 0):
                raise DamagedCheckpointError(
                    f"{TRAINER_STATE}: 'loss_scaler' is {scaler!r}, expected null or "
                    "{'scale': a positive number, 'good_steps': a whole number >= 0}")

    def _check_best(self) -> None:
        # Absent in checkpoints written before validation existed; then there is no best yet.
        # The step may lie past global_step: a run resumed after a kill keeps the best that
        # the killed run saved after the checkpoint it resumed from.
        step, loss = self.best_val_step, self.best_val_loss
        if step is None and loss is None:
            return
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise DamagedCheckpointError(f"{TRAINER_STATE}: 'best_val_step' is {step!r}, "
                                         "expected null or a whole number >= 0")
        if not _is_number(loss) or not math.isfinite(loss) or loss < 0:
            raise DamagedCheckpointError(f"{TRAINER_STATE}: 'best_val_loss' is {loss!r}, "
                                         "expected a finite number >= 0 beside 'best_val_step'")


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _check_count(data: dict[str, Any], name: str, least: int) -> None:
    if name not in data:
        raise DamagedCheckpointError(f"{TRAINER_STATE} lacks '{name}'")
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise DamagedCheckpointError(f"{TRAINER_STATE}: '{name}' is {value!r}, expected a "
                                     f"whole number >= {least}")


def step_of(checkpoint: Path) -> int:
    """The step a ``step_NNNNNNN`` folder is named after, or -1 for any other folder."""
    name = Path(checkpoint).name
    if name.startswith("step_") and name[5:].isdigit():
        return int(name[5:])
    return -1
