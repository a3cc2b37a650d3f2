"""Seeding and small runtime helpers shared by the stages."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, *names: str) -> int:
    """A seed for one named piece of work (an observer, a class), independent of list order."""
    h = hashlib.sha256(":".join([str(seed), *names]).encode()).digest()
    return int.from_bytes(h[:4], "little")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch's global generators; return a fresh generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def progress(iterable=None, **kwargs):
    """A tqdm bar on a terminal (stderr); silent in logs, where stages print a line per epoch."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", None)  # None: only when attached to a TTY
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when this torch sees a GPU, else the CPU; ``cuda`` without a GPU is an error."""
    from edc.errors import ParamsError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError("params.yaml", ["device: cuda, but torch.cuda.is_available() is False "
                                          "(use device: auto or cpu)"])
    return torch.device(name)


def model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def place(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move a model to ``device``; on CUDA in channels_last layout (faster convolutions). A no-op on
    the CPU, so CPU results do not depend on this code."""
    if device.type == "cuda":
        return model.to(device, memory_format=torch.channels_last)
    return model.to(device)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when ``bf16`` is set; a no-op context everywhere else."""
    import contextlib

    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
