"""Learning-rate schedules and fp16 loss scaling."""

from __future__ import annotations

import math

import torch
from torch import nn


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, schedule: str,
                  min_lr_ratio: float = 0.0) -> float:
    """Factor on the peak lr before optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup_steps``, then constant, cosine or linear decay to
    ``min_lr_ratio`` at ``total_steps``. A pure function of the step, so a resumed run gets
    exactly the lr the uninterrupted one had.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"unknown lr schedule '{schedule}'")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


class LRSchedule:
    """The learning rate of every step: ``peak * lr_multiplier(step, ...)``.

    Args:
        peak: The peak learning rate (the config's lr).
        warmup_steps, total_steps, schedule, min_lr_ratio: As :func:`lr_multiplier`.
    """

    def __init__(self, peak: float, *, warmup_steps: int, total_steps: int, schedule: str,
                 min_lr_ratio: float = 0.0):
        self.peak, self.warmup_steps, self.total_steps = peak, warmup_steps, total_steps
        self.schedule, self.min_lr_ratio = schedule, min_lr_ratio

    def __call__(self, step: int) -> float:
        """The lr of optimizer step ``step`` (0-based: the number of steps taken before)."""
        return self.peak * lr_multiplier(step, warmup_steps=self.warmup_steps,
                                          total_steps=self.total_steps, schedule=self.schedule,
                                          min_lr_ratio=self.min_lr_ratio)


class DynamicLossScaler:
    """Loss scaling for fp16: scale the loss up so small gradients survive fp16, unscale before
    the optimizer step, skip steps whose gradients overflowed and halve the scale; double it
    after ``growth_interval`` good steps.

    Works the same on one device and under FSDP2: the overflow check is the gradient norm,
    which clip_grad_norm_ already reduces over all ranks.
    """

    min_scale = 1.0  # below this, scaling no longer explains an overflow
    init_scale = 2.0**16

    def __init__(self, init_scale: float | None = None, growth_interval: int = 2000):
        self.scale = init_scale if init_scale is not None else self.init_scale
        self.growth_interval = growth_interval
        self.good_steps = 0

    def unscale_(self, params: list[nn.Parameter]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, grad_norm_finite: bool) -> bool:
        """Record the outcome of a step; returns whether the optimizer may step."""
        if not grad_norm_finite:
            self.scale = max(self.scale / 2.0, self.min_scale)
            self.good_steps = 0
            return False
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= 2.0
            self.good_steps = 0
        return True

    @property
    def can_back_off(self) -> bool:
        """Whether an overflow can still be blamed on the scale (it is above its minimum):
        at the minimum, non-finite gradients are the model's, not fp16's."""
        return self.scale > self.min_scale

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
