"""Resumable long stages: checkpoints that a rerun picks up, and never a wrong output.

synthesize, relabel and post_evaluate save their state next to their output, in a hidden sibling
``.<output>.resume/`` (for example ``condensed/.images.resume/``), at most every
``EDC_CHECKPOINT_SECONDS`` seconds (default 30). The state holds everything the remaining work
depends on (tensors, optimiser and scheduler states, random generator states, finished results),
so a run that resumes writes the same bytes as one that was never interrupted.

A checkpoint belongs to a *fingerprint*: the stage, its params, the bytes of every input file and
the bytes of the code that runs (the stage script and the ``edc`` package,
:func:`edc.codedeps.package_digest`). A checkpoint made from other inputs or by other code is discarded, never
used. The directory is removed when the stage's outputs are in place. DVC does not track it (it is
not an output) and git ignores it.

``EDC_CRASH_AFTER_CHECKPOINTS=N`` kills the process with SIGKILL right after its N-th checkpoint:
a fault-injection hook for the tests of this guarantee.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from edc.codedeps import package_digest
from edc.io import hash_file
from edc.progress import progress

STATE = "state.pt"
FINGERPRINT = "fingerprint.json"


def fingerprint(stage: str, params: Any, inputs: list[str | Path], code: str | Path | None = None) -> str:
    """sha256 over the stage name, its params (canonical JSON), the name, size and bytes of every input
    file and, with ``code`` (the stage script), the bytes of that script and of every ``edc`` module.
    The files go into the one sha256 (faster than md5 on the CPUs measured, and every stage hashes
    them at its start)."""
    h = hashlib.sha256(json.dumps({"stage": stage, "params": params}, sort_keys=True, default=str).encode())
    if code is not None:
        h.update(f"code:{package_digest(code)}\n".encode())
    for root in inputs:
        root = Path(root)
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        for f in files:
            h.update(f"{f.relative_to(root) if root.is_dir() else f.name}:{f.stat().st_size}\n".encode())
            hash_file(h, f)
    return h.hexdigest()


def resume_dir(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(f".{output.name}.resume")


class Checkpointer:
    """Save and restore one stage's state under :func:`resume_dir` of its output."""

    def __init__(self, output: str | Path, fp: str, every_s: float | None = None):
        self.dir = resume_dir(output)
        self.fp = fp
        env = os.environ.get("EDC_CHECKPOINT_SECONDS")
        self.every_s = every_s if every_s is not None else float(env) if env else 30.0
        self._last = time.monotonic()
        self._saves = 0
        crash = os.environ.get("EDC_CRASH_AFTER_CHECKPOINTS")
        self._crash_after = int(crash) if crash else None

    def _matches(self) -> bool:
        """Whether the directory holds a checkpoint of this fingerprint; one of another is removed."""
        if not self.dir.exists():
            return False
        try:
            same = json.loads((self.dir / FINGERPRINT).read_text()).get("fingerprint") == self.fp
        except (OSError, ValueError):
            same = False
        if not same:
            print(f"{self.dir}: checkpoint of other inputs or params; discarded", flush=True)
            shutil.rmtree(self.dir)
        return same

    def prepare(self) -> Path:
        """The directory, created for this fingerprint if needed (for stages that build their output in it)."""
        if not self._matches():
            self.dir.mkdir(parents=True)
            (self.dir / FINGERPRINT).write_text(json.dumps({"fingerprint": self.fp}) + "\n")
        return self.dir

    def load(self) -> dict | None:
        """The last saved state of this fingerprint, or None. Creates nothing."""
        path = self.dir / STATE
        if not self._matches() or not path.exists():
            return None
        try:
            return torch.load(path, weights_only=True)
        except Exception as exc:  # a torn file cannot happen (atomic replace), but never trust it blindly
            print(f"{path}: unreadable checkpoint ({exc}); starting over", flush=True)
            return None

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every_s

    def save(self, state: dict) -> None:
        """Atomically replace the saved state."""
        self.prepare()
        tmp = self.dir / f".{STATE}.tmp"
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / STATE)
        self._last = time.monotonic()
        self.mark()

    def mark(self) -> None:
        """Count one checkpoint (a stage that keeps its progress as files of its own calls this after
        each); ``EDC_CRASH_AFTER_CHECKPOINTS=N`` SIGKILLs the process at the N-th (tests)."""
        self._saves += 1
        if self._crash_after is not None and self._saves >= self._crash_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def maybe_save(self, make_state) -> None:
        if self.due():
            self.save(make_state())

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def finished_units(ckpt: Checkpointer, world, units: range, is_done: Callable[[int], bool], what: str,
                   stage: str) -> set[int]:
    """The units (synthesis batches, relabel epochs) a killed run left finished in ``ckpt``'s
    directory, the same set on every rank: rank 0 readies the directory (a checkpoint of other
    inputs is discarded), every rank lists, and no rank goes on to add a unit before all have listed."""
    if world.main:
        ckpt.prepare()
    world.barrier()
    done = {u for u in units if is_done(u)}
    world.barrier()
    if done:
        print(f"{stage}: resuming with {len(done)}/{len(units)} {what} done (checkpoint in {ckpt.dir})", flush=True)
    return done


def run_units(ckpt: Checkpointer, world, units: range, is_done: Callable[[int], bool], work: Callable[[int], None],
              *, what: str, stage: str, start: Callable[[], None] | None = None) -> bool:
    """Run the ``units`` (synthesis batches, relabel epochs) that ``is_done`` does not find finished in
    ``ckpt``'s directory (:func:`finished_units`), dealt out to the ranks round-robin; ``work(u)``
    leaves unit u's files there, and the checkpoint is marked after each. ``start()`` runs once the
    directory is ready (a checkpoint of other inputs discarded), before any unit. Every rank waits for
    all; returns whether this rank is rank 0, the one that goes on to merge the units."""
    done = finished_units(ckpt, world, units, is_done, what, stage)
    if start is not None:
        start()
    todo = world.mine([u for u in units if u not in done])
    for u in progress(todo, desc=stage if world.size == 1 else f"{stage} rank {world.rank}", unit=what.rstrip("s")):
        work(u)
        ckpt.mark()
    world.barrier()
    return world.main
