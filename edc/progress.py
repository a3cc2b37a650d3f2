"""Progress of a stage's loops: a bar on a terminal, a line at most every 30 s in logs.

The first item of a process's first loop is also the moment its work begins: whatever waits for
that (the stage's MLflow thread, :mod:`edc.tracking`) registers a hook with :func:`on_work_start`,
so that this module, imported by data and method code, imports no tracking.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable


class LineProgress:
    """Progress for logs (no terminal): one line on stderr at most every ``interval`` seconds
    (``EDC_PROGRESS_SECONDS``, default 30) while the loop runs, e.g.
    ``synthesize batch 1/1: 120/300 it, 41 s, ~62 s left``. Quiet for loops shorter than that."""

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", unit: str = "it",
                 interval: float | None = None, file=None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit = total, desc, unit
        env = os.environ.get("EDC_PROGRESS_SECONDS")
        self.interval = interval if interval is not None else float(env) if env else 30.0
        self.file = file
        self.n = 0
        self.start = self.last = time.monotonic()

    def _line(self, now: float) -> str:
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        line = f"{self.desc}: {done} {self.unit}, {now - self.start:.0f} s"
        if self.total and self.n:
            line += f", ~{(now - self.start) / self.n * (self.total - self.n):.0f} s left"
        return line

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            print(self._line(now), file=self.file or sys.stderr, flush=True)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


STARTUP_PROBE_ENV = "EDC_STARTUP_PROBE"


def _startup_probe(iterable):
    """At the first item: print the wall-clock time and end the process (benchmarks/startup.py)."""
    for _ in iterable:
        print(f"{STARTUP_PROBE_ENV} {time.time():.6f}", flush=True)
        os._exit(0)
    yield from ()


def progress(iterable=None, **kwargs):
    """A tqdm bar on a terminal (stderr); in logs (queued experiments, CI, nohup) a
    :class:`LineProgress` line at most every 30 s, so a long stage is never silent.
    With ``EDC_STARTUP_PROBE`` set, the process ends at the first item, printing the time
    (``benchmarks/startup.py`` measures each stage's start-up so)."""
    if os.environ.get(STARTUP_PROBE_ENV):
        return _startup_probe(iterable)
    if os.environ.get(TIMING_ENV):
        iterable = _clocked(iterable)
    if not sys.stderr.isatty():
        bar = LineProgress(iterable, total=kwargs.get("total"), desc=kwargs.get("desc", ""),
                           unit=kwargs.get("unit", "it"))
    else:
        from tqdm.auto import tqdm

        kwargs.setdefault("leave", False)
        kwargs.setdefault("dynamic_ncols", True)
        bar = tqdm(iterable, **kwargs)
    return _announcing(bar) if _start_hooks else bar


TIMING_ENV = "EDC_TIMING_FILE"
_loop_depth = [0]
# Seconds this process spent in its compute loops (the outermost progress loop only), written to
# EDC_TIMING_FILE by edc.stage.record_timing (benchmarks/overhead.py).
clock = {"loops": 0.0}
# Called once, at the first item of the next progress loop (:func:`on_work_start`).
_start_hooks: list[Callable[[], None]] = []


def on_work_start(hook: Callable[[], None]) -> None:
    """Call ``hook`` once, at the first item of the process's next progress loop: when the stage's
    inputs are read and its work begins."""
    _start_hooks.append(hook)


def clocked(iterable):
    """``iterable`` as a compute loop that shows no progress (an evaluation pass): with ``EDC_TIMING_FILE``
    set its time goes to :data:`clock` as a progress loop's does, so that benchmarks/overhead.py counts
    a test-split forward pass as compute, not as the pipeline's overhead."""
    return _clocked(iterable) if os.environ.get(TIMING_ENV) else iterable


def _clocked(iterable):
    """``iterable``, its time (the loop bodies' included) added to ``clock["loops"]``
    unless an outer loop already counts it."""
    if _loop_depth[0]:
        yield from iterable
        return
    _loop_depth[0] += 1
    start = time.perf_counter()
    try:
        yield from iterable
    finally:
        _loop_depth[0] -= 1
        clock["loops"] += time.perf_counter() - start


def _announcing(iterable):
    """``iterable``, calling the :func:`on_work_start` hooks at its first item."""
    for item in iterable:
        while _start_hooks:
            _start_hooks.pop(0)()
        yield item
