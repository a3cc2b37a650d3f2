"""MLflow glue: one run per stage execution.

Store: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///$DVC_ROOT/mlflow.db``. DVC sets ``DVC_ROOT``
for every stage, also in queued and temp experiments that run in a copy under ``.dvc/tmp/exps/``,
so all runs land in the project's one store. Outside DVC the project root is found by looking for
``.dvc/`` above the working directory.

Each run is named after the stage and tagged with ``edc.stage``, ``dvc.exp_name`` (``DVC_EXP_NAME``,
when DVC runs an experiment), ``git.commit`` and ``edc.seed``. Params are logged flat
(``observers.epochs``); per-epoch metrics with ``step=``. A stage that raises leaves its run FAILED
(KILLED on Ctrl-C).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

EXPERIMENT_ENV = "EDC_MLFLOW_EXPERIMENT"
DEFAULT_EXPERIMENT = "edc"


def project_root(start: str | Path | None = None) -> Path:
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"])
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / ".dvc").is_dir():
            return d
    return here


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{'observers': {'epochs': 5}} -> {'observers.epochs': '5'}; lists become JSON."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return out


def retry_locked(fn: Callable[..., T], *args: Any, attempts: int = 60, **kwargs: Any) -> T:
    """Call ``fn``, retrying while SQLite reports "database is locked": experiments queued with
    ``dvc queue start -j 2`` write one store from several processes at once."""
    delay = 0.05
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # MlflowException or sqlalchemy's OperationalError, depending on the call
            if "locked" not in str(exc).lower() or attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay = min(2 * delay, 1.0)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _creation_lock(uri: str) -> Iterator[None]:
    """An exclusive file lock next to a SQLite store: two processes creating the same new store at
    once race in MLflow's schema migration ("Online migration expected to match one row")."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the race stays possible
        yield
        return
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _git_commit(root: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Run:
    """The handle a stage logs through; thin over the active MLflow run."""

    def __init__(self, mlflow_module, run):
        self._mlflow = mlflow_module
        self.run = run

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        retry_locked(self._mlflow.log_metrics, {k: float(v) for k, v in values.items()}, step=step)

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        retry_locked(self._mlflow.log_artifact, str(path), artifact_path=artifact_path)

    def json(self, obj: Any, name: str) -> None:
        retry_locked(self._mlflow.log_dict, obj, name)


class NullRun:
    """What the ranks other than 0 of a torchrun job log through: nothing."""

    run_id = ""

    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        pass

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def json(self, obj: Any, name: str) -> None:
        pass


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any], seed: int | None = None,
              enabled: bool = True) -> Iterator[Run | NullRun]:
    """Start an MLflow run for ``stage``, log ``params`` flat and the tags; end it FINISHED, or FAILED
    if the block raises. ``enabled=False`` (ranks > 0 under torchrun) logs nothing."""
    if not enabled:
        yield NullRun()
        return
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with _creation_lock(uri):  # the first process to touch a new store creates its tables; others wait
        retry_locked(mlflow.set_experiment, os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT))
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    tags = {"edc.stage": stage, "git.commit": _git_commit(project_root())}
    if exp_name:
        tags["dvc.exp_name"] = exp_name
    if seed is not None:
        tags["edc.seed"] = str(seed)
    run_name = f"{stage}:{exp_name}" if exp_name else stage
    active = retry_locked(mlflow.start_run, run_name=run_name, tags=tags)
    status = "FAILED"
    try:
        flat = flatten(params)
        retry_locked(mlflow.log_params, {k: v[:6000] for k, v in flat.items()})
        yield Run(mlflow, active)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        retry_locked(mlflow.end_run, status=status)
