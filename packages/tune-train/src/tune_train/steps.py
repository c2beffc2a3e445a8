"""The numerics of an optimizer step that every recipe shares, as functions it calls.

A recipe's step reads::

    tokens = steps.count_tokens(micro_batches, device)        # over every process
    for batch in micro_batches:
        loss = loss_fn(model, steps.to_device(batch, device))   # summed over target tokens
        (loss * tokens.loss_weight(scaler)).backward()
        loss_sum += loss.detach()
    mean_loss = steps.mean_loss(loss_sum, tokens, step)         # stops a run gone non-finite
    result = steps.optimizer_step(optimizer, params, lr=..., max_grad_norm=..., ...)

Losses are sums over target tokens, normalised once by the target tokens of the whole step
on every process: k micro-batches (or k processes) give the update of one k-times bigger
batch, and a token weighs the same in a short sample as in a long one. A step whose numbers
stop being finite raises :class:`Diverged` before it can change a weight (fp16's loss scaler
excepted: it skips a step whose scaled gradients overflowed and retries at a lower scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tune_data import IGNORE_INDEX
from tune_train.distributed import all_reduce_sum, world_size


class Diverged(Exception):
    """A step's loss, gradients or updated weights stopped being finite.

    Attributes:
        step: The optimizer step (1-based) it happened at.
        problem: What was not finite, in words.
    """

    def __init__(self, step: int, problem: str):
        super().__init__(f"training diverged at step {step}: {problem}")
        self.step, self.problem = step, problem


@dataclass(frozen=True)
class StepTokens:
    """The tokens of one optimizer step, over every process.

    Attributes:
        targets: Tokens that take a loss.
        seen: Tokens the model read (padding excluded), for tokens/s.
        world_size: Processes taking part.
    """

    targets: float
    seen: float
    world_size: int = 1

    def loss_weight(self, loss_scaler=None) -> float:
        """What a micro-batch's summed loss is multiplied by before ``backward``.

        FSDP averages gradients over processes; multiplying by the number of processes undoes
        that, so the gradient is the sum over every target token of the step divided by their
        number. fp16's loss scale is applied here too.
        """
        scale = loss_scaler.scale if loss_scaler is not None else 1.0
        return scale / (max(self.targets, 1.0) / self.world_size)


def count_tokens(micro_batches: list[dict[str, torch.Tensor]],
                 device: torch.device | str) -> StepTokens:
    """Count the step's target tokens and read tokens, summed over every process."""
    targets = sum(int((m["labels"] != IGNORE_INDEX).sum()) for m in micro_batches)
    seen = sum(int(m["real_tokens"]) if "real_tokens" in m else m["tokens"].numel()
               for m in micro_batches)
    counts = all_reduce_sum(torch.tensor([float(targets), float(seen)], device=device))
    total_targets, total_seen = counts.tolist()
    return StepTokens(total_targets, total_seen, world_size())


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str
              ) -> dict[str, torch.Tensor]:
    """A batch's tensors on ``device`` (the bookkeeping entry ``real_tokens`` left out)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()
            if k != "real_tokens"}


def mean_loss(loss_sum: torch.Tensor, tokens: StepTokens, step: int) -> float:
    """The step's loss per target token over every process.

    Args:
        loss_sum: This process's summed token losses of the step.
        tokens: The step's tokens (:func:`count_tokens`).
        step: The step being taken (1-based), for the message.

    Raises:
        Diverged: If the loss is not finite.
    """
    loss = all_reduce_sum(loss_sum.detach().clone()).item() / max(tokens.targets, 1.0)
    if not math.isfinite(loss):
        raise Diverged(step, f"the loss is {loss}")
    return loss


@dataclass(frozen=True)
class StepResult:
    """What an optimizer step did: the gradient norm before clipping, and whether the
    optimizer stepped (fp16's loss scaler skips steps that overflowed)."""

    grad_norm: float
    stepped: bool


def optimizer_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], *,
                   lr: float, max_grad_norm: float | None, step: int,
                   loss_scaler=None) -> StepResult:
    """Unscale (fp16), set the learning rate, clip, step and zero the gradients.

    Args:
        optimizer: The optimizer.
        params: The parameters it trains (their gradients are clipped together).
        lr: The learning rate of this step.
        max_grad_norm: Clip the gradient norm to this; None for no clipping.
        step: The step being taken (1-based), for messages.
        loss_scaler: fp16's ``DynamicLossScaler``, or None.

    Raises:
        Diverged: If the gradient norm is not finite (and no loss scale explains it); the
            weights are unchanged.
    """
    if loss_scaler is not None:
        loss_scaler.unscale_(params)
    for group in optimizer.param_groups:
        group["lr"] = lr
    max_norm = max_grad_norm if max_grad_norm is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    grad_norm = float(grad_norm)
    finite = math.isfinite(grad_norm)
    if not finite and not (loss_scaler is not None and loss_scaler.can_back_off):
        # Stepping would ruin the weights.
        optimizer.zero_grad(set_to_none=True)
        raise Diverged(step, f"the gradient norm is {grad_norm}")
    stepped = loss_scaler.update(finite) if loss_scaler is not None else True
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(grad_norm, stepped)


def check_weights_finite(params: list[torch.nn.Parameter], device: torch.device | str,
                         step: int) -> None:
    """Refuse weights that hold inf or nan (a step with a finite loss and gradient can still
    overflow them), on every process; call it before a checkpoint.

    Raises:
        Diverged: Naming ``step``, if any trained weight on any process is not finite.
    """
    bad = torch.zeros((), device=device)
    with torch.no_grad():
        for p in params:  # the trained ones: frozen weights cannot change
            local = p.to_local() if hasattr(p, "to_local") else p  # this process's shard
            bad += (~torch.isfinite(local)).any().to(bad.device)
    if all_reduce_sum(bad).item():
        raise Diverged(step, "its update made some weights inf or nan")
