"""Where torch runs: the device, bf16 autocast, and the thread count of a stage process."""

from __future__ import annotations

import os

import torch


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


# Threads: how many cores this process's torch uses. Set once per process, at stage start
# (:func:`edc.stage.stage_main`), never by a params key, so a change reruns no stage.
THREADS_ENV = "EDC_THREADS"  # torch threads of each stage process
JOBS_ENV = "EDC_JOBS"  # processes sharing the machine (queue workers); default threads = cores // jobs


def _positive_env(env, name: str) -> int | None:
    from edc.errors import EdcError

    text = env.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise EdcError(f"environment variable {name}: must be a positive whole number (got {text!r})")
    return int(text)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_threads(env=None, cores: int | None = None) -> int:
    """torch threads for a stage process: ``EDC_THREADS`` when set; else ``OMP_NUM_THREADS`` when set
    (torch's own variable; torchrun sets it to 1 for several ranks); else the usable cores divided
    by ``EDC_JOBS`` (processes side by side, default 1) and by ``LOCAL_WORLD_SIZE`` (torchrun's ranks
    on this machine), at least 1. Two processes that each took every core would slow each other
    several-fold, so side-by-side runs must divide them."""
    env = os.environ if env is None else env
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        n = _positive_env(env, name)
        if n is not None:
            return n
    jobs = _positive_env(env, JOBS_ENV) or 1
    ranks = _positive_env(env, "LOCAL_WORLD_SIZE") or 1
    return max(1, (cores or usable_cores()) // (jobs * ranks))


def configure_threads(threads: int | None = None) -> int:
    """Give torch ``threads`` intra-op threads (default :func:`resolve_threads`) and one inter-op
    thread (these models run one operator at a time); returns the count. The inter-op count can be
    set only before torch's first parallel work, so a later call keeps the one in place."""
    n = resolve_threads() if threads is None else threads
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    return n
