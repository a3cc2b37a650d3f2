"""MLflow glue: one run per stage, params flat, tags, FAILED on error, default store under DVC_ROOT."""

from __future__ import annotations

import mlflow
import pytest

from edc import tracking
from edc.tracking import Run, TrackingError, flatten, stage_run, tracking_uri


def runs_named(name):
    return [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
            if r.info.run_name == name]


def test_run_logs_params_metrics_and_tags(monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-exp")
    with stage_run("demo_ok", {"seed": 3, "observers": {"epochs": 2, "models": [{"name": "a"}]}}, seed=3) as run:
        run.metrics({"loss": 0.5}, step=1)
        run.metrics({"loss": 0.25}, step=2)
    (r,) = runs_named("demo_ok:lucky-exp")
    assert r.info.status == "FINISHED"
    assert r.data.params == {"seed": "3", "observers.epochs": "2", "observers.models": '[{"name": "a"}]'}
    assert r.data.tags["edc.stage"] == "demo_ok" and r.data.tags["dvc.exp_name"] == "lucky-exp"
    assert r.data.tags["edc.seed"] == "3" and r.data.tags["git.commit"]
    history = mlflow.MlflowClient().get_metric_history(r.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.25)]


def test_a_stage_that_raises_leaves_its_run_failed():
    with pytest.raises(RuntimeError):
        with stage_run("demo_fail", {"x": 1}):
            raise RuntimeError("boom")
    (r,) = runs_named("demo_fail")
    assert r.info.status == "FAILED"


@pytest.mark.parametrize("flush_seconds", [0.0, 3600.0])
def test_nested_runs_get_their_own_metrics_in_order(monkeypatch, flush_seconds):
    """Metrics go out in batches (every FLUSH_SECONDS, and when a run ends): each run gets its own
    values at their steps whichever way they were batched."""
    monkeypatch.setattr(Run, "FLUSH_SECONDS", flush_seconds)
    name = f"demo_nested_{int(flush_seconds)}"
    with stage_run(name, {"x": 1}) as run:
        for step in range(1, 31):
            run.metrics({"loss": 1.0 / step}, step=step)
        with run.child(f"{name} child", {"edc.seed": "0"}) as child:
            for step in range(1, 4):
                child.metrics({"acc": step / 10, "loss": 9.0}, step=step)
        run.metrics({"final": 0.5})
    (parent,) = runs_named(name)
    (kid,) = runs_named(f"{name} child")
    client = mlflow.MlflowClient()
    assert kid.data.tags["mlflow.parentRunId"] == parent.info.run_id and kid.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "loss")] == \
        [(s, 1.0 / s) for s in range(1, 31)]
    acc = client.get_metric_history(kid.info.run_id, "acc")
    assert [(m.step, m.value) for m in acc] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert parent.data.metrics["final"] == 0.5 and "acc" not in parent.data.metrics


def test_a_tracking_failure_fails_the_stage_after_its_work_but_never_hides_the_stage_error(monkeypatch, tmp_path):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the store's folder should be")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocked}/mlflow.db")
    done = []
    with pytest.raises(TrackingError, match="not-a-dir"):
        with stage_run("demo_store_broken", {"x": 1}) as run:
            run.metrics({"loss": 1.0}, step=1)
            done.append(True)
    assert done == [True]  # the stage's work ran before the store was found broken
    with pytest.raises(RuntimeError, match="boom"):
        with stage_run("demo_store_broken", {"x": 1}):
            raise RuntimeError("boom")


def test_default_store_is_under_dvc_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.delenv("DVC_ROOT")
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere.db")
    assert tracking_uri() == "sqlite:////elsewhere.db"


def test_flatten():
    assert flatten({"a": {"b": {"c": 1}}, "d": [1, 2], "e": "s", "f": None}) == \
        {"a.b.c": "1", "d": "[1, 2]", "e": "s", "f": "null"}


def test_concurrent_writers_lose_no_metric(tmp_path, monkeypatch):
    """Two processes logging to one SQLite store at once (as `dvc queue start -j 2` does) keep every value."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    code = ("import sys\nfrom edc.tracking import stage_run\n"
            "with stage_run('writer', {'who': sys.argv[1]}) as run:\n"
            "    for i in range(150):\n"
            "        run.metrics({'a': i, 'b': 2 * i}, step=i)\n")
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": uri}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(w)], env=env, stderr=subprocess.PIPE, text=True)
             for w in range(3)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert sorted(r.data.params["who"] for r in runs) == ["0", "1", "2"]
    client = mlflow.MlflowClient()
    for r in runs:
        assert r.info.status == "FINISHED"
        assert [m.value for m in client.get_metric_history(r.info.run_id, "b")] == [2.0 * i for i in range(150)]


@pytest.mark.parametrize("message, fails, calls, ok", [
    ("(sqlite3.OperationalError) database is locked", 5, 6, True),  # another process writing: wait it out
    ("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name", 1, 2, True),
    ("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.name", 99, tracking.RACE_ATTEMPTS, False),
    ("(sqlite3.IntegrityError) NOT NULL constraint failed: runs.name", 99, 1, False),  # not a race: at once
])
def test_store_writes_retry_a_locked_store_and_a_lost_insert_race_only(monkeypatch, message, fails, calls, ok):
    """Two queued experiments that log the same dataset at once: the second insert breaks the UNIQUE
    constraint the first one just satisfied, and its retry finds the row (the failure that stopped a
    `dvc queue start -j 2` run's relabel stage). A constraint that stays broken fails after a few
    tries; any other error at once."""
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    seen = []

    def write():
        seen.append(1)
        if len(seen) <= fails:
            raise RuntimeError(message)
        return "logged"

    if ok:
        assert tracking.retry_locked(write) == "logged"
    else:
        with pytest.raises(RuntimeError, match="constraint failed"):
            tracking.retry_locked(write)
    assert len(seen) == calls
