"""Learning-rate schedules as plain functions of the step, for ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

import math
from collections.abc import Callable


def cosine(total_steps: int) -> Callable[[int], float]:
    """(1 + cos(pi * t / T)) / 2: from 1 at t = 0 to 0 at t = T."""
    total = max(total_steps, 1)
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def lr_lambda(name: str, total_steps: int) -> Callable[[int], float]:
    if name == "cosine":
        return cosine(total_steps)
    if name == "constant":
        return lambda step: 1.0
    raise ValueError(f"unknown schedule {name!r}")
