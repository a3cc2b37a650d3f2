"""MLflow glue: one run per stage, params flat, tags, FAILED on error, default store under DVC_ROOT."""

from __future__ import annotations

import mlflow
import pytest

from edc.tracking import flatten, stage_run, tracking_uri


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
