"""Learning-rate schedules as plain functions of the step, for ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

import math
from collections.abc import Callable


def cosine(total_steps: int) -> Callable[[int], float]:
    """(1 + cos(pi * t / T)) / 2: from 1 at t = 0 to 0 at t = T."""
    total = max(total_steps, 1)
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def lr_lambda(name: str, total_steps: int, zeta: float = 1.0, milestones: list[float] | None = None,
              gamma: float = 0.1) -> Callable[[int], float]:
    """The schedule ``name`` over ``total_steps`` as a multiplier of the base learning rate."""
    if name == "cosine":
        return cosine(total_steps)
    if name == "constant":
        return lambda step: 1.0
    if name == "smoothing":
        return smoothing(total_steps, zeta)
    if name == "ssrs":
        return ssrs(total_steps, zeta)
    if name == "multistep":
        return multistep(total_steps, milestones or [], gamma)
    raise ValueError(f"unknown schedule {name!r}")


def smoothing(total_steps: int, zeta: float) -> Callable[[int], float]:
    """EDC/RDED's smoothing schedule mu(i) = (1 + cos(i * pi / (zeta * N))) / 2; zeta = 1 is cosine,
    larger zeta ends higher (zeta = 2 ends at 1/2)."""
    n = max(total_steps, 1)
    return lambda i: 0.5 * (1 + math.cos(math.pi * min(i, n) / (zeta * n)))


def ssrs(total_steps: int, zeta: float) -> Callable[[int], float]:
    """Early-smoothing, later-steep schedule (paper appendix Eq. 33), as printed there: the smoothing
    schedule up to 5N/6, then (1 + cos(5 pi / (6 zeta))) / 2 * (6N - 6i) / (6N), i.e. a step down
    followed by a linear decay to 0 at N."""
    n = max(total_steps, 1)
    knee = 0.5 * (1 + math.cos(5 * math.pi / (6 * zeta)))

    def f(i: int) -> float:
        i = min(i, n)
        if i <= 5 * n / 6:
            return 0.5 * (1 + math.cos(math.pi * i / (zeta * n)))
        return knee * (6 * n - 6 * i) / (6 * n)

    return f


def multistep(total_steps: int, milestones: list[float], gamma: float) -> Callable[[int], float]:
    """MultiStepLR with milestones given as fractions of training (0.8 = after 80 % of the steps)."""
    marks = sorted(int(round(m * total_steps)) for m in milestones)
    return lambda i: gamma ** sum(i >= m for m in marks)
