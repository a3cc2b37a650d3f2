"""Seeds: one per named piece of work, one per trial, and the process's global generators."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, *names: str) -> int:
    """A seed for one named piece of work (an observer, a class), independent of list order."""
    h = hashlib.sha256(":".join([str(seed), *names]).encode()).digest()
    return int.from_bytes(h[:4], "little")


def trial_seed(seed: int, trial: int) -> int:
    """The seed a trial's own work derives from (the initial draw, synthesis, the relabel plan, the
    students): ``seed`` itself for trial 0, so that the default run keeps its bytes, and a seed
    hashed from (seed, trial) for the others. The split, observers and statistics use ``seed`` alone
    and are shared by every trial."""
    return seed if trial == 0 else derive_seed(seed, "trial", str(trial))


def trial_meta(trial: int) -> dict:
    """The trial as a set's provenance records it: absent for trial 0, so that the default run's
    files keep their bytes."""
    return {"trial": trial} if trial else {}


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch's global generators; return a fresh generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
