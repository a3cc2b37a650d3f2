"""Shared helpers for the benchmarks: medians of repeated timings and the default artifacts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine_line() -> str:
    """Where a benchmark ran: CPU model, usable cores, torch version and threads (print it first, so
    that a figure is never read without the machine it came from)."""
    import os
    import platform

    import torch

    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"machine: {model}; {cores} usable cores; torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads; python {platform.python_version()}")


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def paired_times(fns: list[Callable[[], object]], repeats: int = 5, warmup: int = 1) -> list[float]:
    """Median wall time of each of ``fns``, run interleaved (f0, f1, ..., f0, f1, ...) so that a noisy
    machine slows them alike; element i > 0 is also returned as the median of the per-round ratios
    to ``fns[0]`` via :func:`paired_ratios`."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    rounds = []
    for _ in range(repeats):
        times = []
        for fn in fns:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        rounds.append(times)
    paired_times.last_rounds = rounds
    return [statistics.median(r[i] for r in rounds) for i in range(len(fns))]


def paired_ratios() -> list[tuple[float, float, float]]:
    """For the last :func:`paired_times` call: (min, median, max) over rounds of time_i / time_0."""
    rounds = paired_times.last_rounds
    out = []
    for i in range(len(rounds[0])):
        r = [t[i] / t[0] for t in rounds]
        out.append((min(r), statistics.median(r), max(r)))
    return out


def need(path: Path) -> Path:
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `make repro` (or `dvc repro`) first")
    return path


def row(name: str, seconds: float, base: float | None = None, note: str = "",
        ratio: tuple[float, float, float] | None = None) -> str:
    """One table line. ``ratio`` (a paired (min, median, max), :func:`paired_ratios`) prints as
    ``median x (min-max)``; without it the ratio is seconds / base."""
    if ratio is not None:
        lo, med, hi = ratio
        shown = f"{med:6.2f}x ({lo:.2f}-{hi:.2f})"
    else:
        shown = f"{seconds / base:6.2f}x" + " " * 12 if base else " " * 19
    return f"  {name:<58} {seconds * 1000:10.1f} ms  {shown}  {note}"
