"""The learning-rate schedule of a job: linear warm-up, then constant, linear or cosine decay.

Step i (0-based, the i-th optimizer update) uses `learning_rate * lr_factor(i, ...)`. With
`W = warmup_steps` and `N = steps`:

    i < W:   (i + 1) / W                                  (warm-up; the W-th step is at full rate)
    i >= W:  f = (i - W) / (N - W)   in [0, 1)
             constant 1,  linear 1 - f,  cosine (1 + cos(pi f)) / 2

so the first step after warm-up runs at full rate and the decay reaches 0 one step past the last
(no step is wasted at rate 0), as in the usual linear/cosine-with-warm-up schedules. The scheduler
is a `torch.optim.lr_scheduler.LambdaLR` stepped once per optimizer step; its state is saved with
the optimizer in every checkpoint, so a resumed job continues it exactly.
"""

from __future__ import annotations

import functools
import math

import torch


def lr_factor(i: int, warmup_steps: int, steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step `i` (0-based)."""
    if i < warmup_steps:
        return (i + 1) / warmup_steps
    if schedule == "constant" or steps <= warmup_steps:
        return 1.0
    f = min((i - warmup_steps) / (steps - warmup_steps), 1.0)
    if schedule == "linear":
        return 1.0 - f
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * f))
    raise ValueError(f"unknown lr_schedule {schedule!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, steps: int,
                   schedule: str) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying `lr_factor`; it sets the first step's rate on the optimizer now."""
    factor = functools.partial(lr_factor, warmup_steps=warmup_steps, steps=steps,
                               schedule=schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
