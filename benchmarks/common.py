"""Shared helpers for the benchmarks: medians of repeated timings and the default artifacts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def need(path: Path) -> Path:
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `make repro` (or `dvc repro`) first")
    return path


def row(name: str, seconds: float, base: float | None = None, note: str = "") -> str:
    ratio = f"{seconds / base:6.2f}x" if base else "      "
    return f"  {name:<52} {seconds * 1000:10.1f} ms  {ratio}  {note}"
