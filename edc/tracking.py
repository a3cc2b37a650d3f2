"""MLflow glue: one parent run per pipeline run, one nested run per stage execution.

Store: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///$DVC_ROOT/mlflow.db``. DVC sets ``DVC_ROOT``
for every stage, also in queued and temp experiments that run in a copy under ``.dvc/tmp/exps/``,
so all runs land in the project's one store. Outside DVC the project root is found by looking for
``.dvc/`` above the working directory.

Each run is named after the stage and tagged with ``edc.stage``, ``dvc.exp_name`` (``DVC_EXP_NAME``,
when DVC runs an experiment), ``git.commit`` and ``edc.seed``. Params are logged flat
(``observers.epochs``); per-epoch metrics with ``step=``. A stage that raises leaves its run FAILED
(KILLED on Ctrl-C).

Stage runs of one ``dvc repro`` or one ``dvc exp run`` (queued ones included) are nested under one
parent run, named after the experiment (or ``dvc repro``) and tagged ``edc.invocation`` with the
identity of the DVC process that runs the stages (its pid and start time, read from ``/proc``); the
parent ends FINISHED after the last stage, FAILED if one fails. A stage run outside DVC has no
parent. Post-evaluation nests one run per student and seed under its stage run (:meth:`Run.child`).
The experiment is ``edc``, or the one ``EDC_MLFLOW_EXPERIMENT`` names (also for ``edc report``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from edc.errors import EdcError
from edc.progress import on_work_start

T = TypeVar("T")

EXPERIMENT_ENV = "EDC_MLFLOW_EXPERIMENT"
DEFAULT_EXPERIMENT = "edc"


# Set by the first item of a stage's first progress loop (edc.progress.on_work_start): the stage's
# MLflow thread imports MLflow and opens the store from then on, while the work computes, rather
# than while the stage is still importing and reading its inputs.
work_started = threading.Event()
on_work_start(work_started.set)
# Seconds this stage process spent waiting for MLflow at its end; written, with its loops' time
# (edc.progress.clock) and the process's start-up, to EDC_TIMING_FILE by edc.stage.stage_main
# (benchmarks/overhead.py).
stage_clock = {"mlflow_wait": 0.0}


class TrackingError(EdcError):
    """Logging the stage to MLflow failed."""


def mlflow_experiment() -> str:
    """The name of the MLflow experiment the stages log to and ``edc report`` reads (not a DVC
    experiment's name: those are :func:`edc.presets.experiment_name`'s)."""
    return os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time in clock ticks) of ``pid`` from /proc, or None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]), fields[19]


def dvc_invocation(pid: int | None = None) -> str | None:
    """``<pid>-<start time>`` of the nearest ancestor process that is DVC (``dvc repro``, ``dvc exp
    run`` or a queue's ``dvc exp exec-run``): the same for every stage that one DVC command runs.
    None when no DVC process runs this one, or without /proc."""
    if not os.environ.get("DVC_ROOT") and not os.environ.get("DVC_STAGE"):
        return None
    pid = os.getppid() if pid is None else pid
    for _ in range(16):
        st = _proc_stat(pid)
        if st is None or pid <= 1:
            return None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        names = [Path(a.decode(errors="replace")).name for a in argv[:3]]
        if "dvc" in names:
            return f"{pid}-{st[1]}"
        pid = st[0]
    return None


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


RACE_ATTEMPTS = 3  # tries of a write that lost an insert race (retry_locked)


def retry_locked(fn: Callable[..., T], *args: Any, attempts: int = 60, **kwargs: Any) -> T:
    """Call ``fn``, retrying while SQLite reports "database is locked": experiments queued with
    ``dvc queue start -j 2`` write one store from several processes at once. Also retried, at most
    ``RACE_ATTEMPTS`` times: a UNIQUE constraint that another process's insert of the same row broke
    between MLflow's look-up and its insert (two experiments logging the same dataset, say: the second
    call finds the row and links it)."""
    delay = 0.05
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # MlflowException or sqlalchemy's OperationalError, depending on the call
            msg = str(exc).lower()
            locked = "locked" in msg and attempt < attempts - 1
            raced = "unique constraint failed" in msg and attempt < min(attempts, RACE_ATTEMPTS) - 1
            if not (locked or raced):
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


class _Worker:
    """One thread that makes all of a stage's MLflow calls, in the order the stage asked for them.

    Importing MLflow and opening its store take seconds, and every metric write is an SQLite
    transaction: on this thread they overlap the stage's own work instead of delaying its first batch. An error is
    kept (and the calls after it skipped) until :meth:`close` hands it back."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="edc-mlflow", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, done = item
            if self.error is None:
                try:
                    fn()
                except BaseException as exc:  # handed back by close()
                    self.error = exc
            if done is not None:
                done.set()

    def submit(self, fn: Callable[[], object]) -> None:
        self._queue.put((fn, None))

    def wait(self) -> None:
        """Until every call submitted so far has been made."""
        done = threading.Event()
        self._queue.put((lambda: None, done))
        done.wait()

    def close(self) -> BaseException | None:
        self._queue.put(None)
        self._thread.join()
        return self.error


class Run:
    """The handle a stage logs through: each call is queued for the stage's MLflow thread
    (:class:`_Worker`). Metrics are sent in batches, at the latest ``FLUSH_SECONDS`` after they were
    logged, and when the run ends."""

    FLUSH_SECONDS = 5.0

    def __init__(self, worker: _Worker, state: dict[str, Any]):
        self._worker, self._state = worker, state  # state: "mlflow" and "run", filled by the worker
        self._pending: list[tuple[str, float, int, int]] = []
        self._since = 0.0

    @property
    def run_id(self) -> str:
        work_started.set()
        self._worker.wait()
        return self._state["run"].info.run_id

    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        now = time.time()
        if not self._pending:
            self._since = now
        self._pending += [(k, float(v), int(now * 1000), step or 0) for k, v in values.items()]
        if now - self._since >= self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Send the metrics logged so far (one ``log_batch`` per 1,000 values, MLflow's limit)."""
        rows, self._pending = self._pending, []
        if not rows:
            return

        def send() -> None:
            from mlflow.entities import Metric

            client, run_id = self._state["mlflow"].MlflowClient(), self._state["run"].info.run_id
            for i in range(0, len(rows), 1000):
                retry_locked(client.log_batch, run_id, metrics=[Metric(*r) for r in rows[i:i + 1000]])

        self._worker.submit(send)

    def _call(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.flush()
        self._worker.submit(lambda: retry_locked(getattr(self._state["mlflow"], name), *args, **kwargs))

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", str(path), artifact_path=artifact_path)

    def json(self, obj: Any, name: str) -> None:
        self._call("log_dict", json.loads(json.dumps(obj)), name)  # a copy: the stage may change obj

    def dataset(self, path: str | Path, name: str, digest: str, context: str) -> None:
        """``mlflow.log_input``: the run used (or made) the dataset at ``path``, identified by ``digest``."""
        url = Path(path).resolve().as_uri()

        def send() -> None:
            from mlflow.data.http_dataset_source import HTTPDatasetSource
            from mlflow.data.meta_dataset import MetaDataset

            dataset = MetaDataset(HTTPDatasetSource(url=url), name=name, digest=digest[:36])
            retry_locked(self._state["mlflow"].log_input, dataset, context=context)

        self.flush()
        self._worker.submit(send)

    @contextlib.contextmanager
    def child(self, name: str, tags: Mapping[str, str] | None = None) -> Iterator[Run]:
        """A run nested under this one (one student and seed of post-evaluation); FINISHED at the end
        of the block, FAILED if it raises."""
        self.flush()
        state: dict[str, Any] = {}

        def start() -> None:
            state["mlflow"] = self._state["mlflow"]
            state["run"] = retry_locked(state["mlflow"].start_run, run_name=name, nested=True, tags=dict(tags or {}))

        self._worker.submit(start)
        child = Run(self._worker, state)
        status = "FAILED"
        try:
            yield child
            status = "FINISHED"
        finally:
            child.flush()
            self._worker.submit(lambda: retry_locked(state["mlflow"].end_run, status=status))


class NullRun:
    """What the ranks other than 0 of a torchrun job log through: nothing."""

    run_id = ""

    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        pass

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def json(self, obj: Any, name: str) -> None:
        pass

    def dataset(self, path: str | Path, name: str, digest: str, context: str) -> None:
        pass

    @contextlib.contextmanager
    def child(self, name: str, tags: Mapping[str, str] | None = None) -> Iterator[NullRun]:
        yield self


def _parent_run(client, experiment_id: str, invocation: str, uri: str, tags: dict[str, str]) -> str:
    """The id of the pipeline run of ``invocation``, created (RUNNING) by the first stage that asks."""
    with _creation_lock(uri):
        found = retry_locked(client.search_runs, [experiment_id],
                             filter_string=f"tags.`edc.invocation` = '{invocation}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
            retry_locked(client.update_run, run_id, status="RUNNING")
            return run_id
        name = tags.get("dvc.exp_name") or "dvc repro"
        run = retry_locked(client.create_run, experiment_id, run_name=name,
                           tags={**tags, "edc.invocation": invocation, "edc.pipeline": "true"})
        return run.info.run_id


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any], seed: int | None = None,
              enabled: bool = True) -> Iterator[Run | NullRun]:
    """Start an MLflow run for ``stage``, log ``params`` flat and the tags; end it FINISHED, or FAILED
    if the block raises. ``enabled=False`` (ranks > 0 under torchrun) logs nothing.

    MLflow is imported, and every call made, on a thread of its own (:class:`_Worker`), from the
    stage's first progress item on (:data:`work_started`): the stage starts its work at once, and
    waits for the last writes when it ends. A tracking error fails the
    stage then (:class:`TrackingError`), unless the stage itself failed first."""
    if not enabled:
        yield NullRun()
        return
    flat = flatten(params)
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    invocation = dvc_invocation()
    uri = tracking_uri()
    state: dict[str, Any] = {}

    def start() -> None:
        work_started.wait()
        logging.getLogger("alembic").setLevel(logging.WARNING)
        import mlflow

        state["mlflow"] = mlflow
        mlflow.set_tracking_uri(uri)
        with _creation_lock(uri):  # the first process to touch a new store creates its tables; others wait
            experiment = retry_locked(mlflow.set_experiment, mlflow_experiment())
        common = {"git.commit": _git_commit(project_root())}
        if exp_name:
            common["dvc.exp_name"] = exp_name
        import torch  # loaded already: the stage's own

        # The thread count can change a result's last bits (edc.runtime.configure_threads): record it.
        tags = {"edc.stage": stage, "edc.threads": str(torch.get_num_threads()), **common}
        if seed is not None:
            tags["edc.seed"] = str(seed)
        client = mlflow.MlflowClient()
        state["parent"] = (_parent_run(client, experiment.experiment_id, invocation, uri, common)
                           if invocation else None)
        state["run"] = retry_locked(mlflow.start_run, run_name=f"{stage}:{exp_name}" if exp_name else stage,
                                    tags=tags, parent_run_id=state["parent"])
        retry_locked(mlflow.log_params, {k: v[:6000] for k, v in flat.items()})

    def end(status: str) -> None:
        mlflow = state["mlflow"]
        retry_locked(mlflow.end_run, status=status)
        if state["parent"] is not None:  # the last stage leaves the pipeline run FINISHED; a failed one, FAILED
            retry_locked(mlflow.MlflowClient().set_terminated, state["parent"], status=status)

    worker = _Worker()
    worker.submit(start)
    run = Run(worker, state)
    status, failed = "FAILED", True
    try:
        yield run
        status, failed = "FINISHED", False
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        work_started.set()  # a stage without a progress loop, or one that failed before it: log now
        waited = time.perf_counter()
        run.flush()
        worker.submit(lambda: end(status))
        error = worker.close()
        stage_clock["mlflow_wait"] += time.perf_counter() - waited
        if error is not None and not failed:
            raise TrackingError(f"MLflow tracking to {uri} failed: {type(error).__name__}: {error}") from error
        if error is not None:
            print(f"{stage}: MLflow tracking to {uri} also failed: {type(error).__name__}: {error}", file=sys.stderr)
