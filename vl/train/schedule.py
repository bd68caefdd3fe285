"""Learning-rate schedules: linear warmup, then linear or cosine decay (or a constant rate).

The schedule is a multiplier of the base learning rate, a pure function of the optimizer step, so that a
``LambdaLR`` built from it resumes exactly from its saved ``last_epoch``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

ScheduleName = Literal["linear", "cosine", "constant"]
SCHEDULES = ("linear", "cosine", "constant")


def lr_multiplier(
    step: int, total_steps: int, warmup_steps: int, schedule: ScheduleName = "linear", min_ratio: float = 0.0
) -> float:
    """The learning-rate factor after ``step`` optimizer steps (step 0 is the first update).

    Warmup rises linearly from 1/(warmup+1) to 1 over ``warmup_steps`` steps; after it, "linear" decays linearly
    and "cosine" along a half cosine to ``min_ratio`` at ``total_steps``; "constant" stays at 1.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule '{schedule}' (known: {', '.join(SCHEDULES)})")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    schedule: ScheduleName = "linear",
    min_ratio: float = 0.0,
) -> LambdaLR:
    """A ``LambdaLR`` over ``lr_multiplier``; its state dict holds plain numbers only."""

    def multiplier(step: int) -> float:
        return lr_multiplier(step, total_steps, warmup_steps, schedule, min_ratio)

    lambdas: Callable[[int], float] = multiplier
    return LambdaLR(optimizer, lambdas)


def restore_rate(scheduler: LambdaLR) -> None:
    """Set every group's learning rate to the schedule's at the scheduler's step, after loading a checkpoint.

    The optimizer state holds the rate of the schedule it was saved under; a run resumed with another total
    number of steps (trained to N, then continued to 2N) follows the new schedule from its next step.
    """
    rates = [base * rate(scheduler.last_epoch) for base, rate in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = lr
    scheduler._last_lr = rates
