"""Throughput: the thread count each stage process takes, queued experiments side by side, and
post_evaluate's seeds in parallel processes (``eval_jobs``), which change no result."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from edc.errors import EdcError
from edc.io import md5_file
from edc.params import read_yaml
from edc.runtime import resolve_threads
from tests.helpers import ARGS, ROOT, md5_tree, tiny_params, write_yaml


@pytest.mark.parametrize("env, cores, want", [
    ({}, 2, 2),                                   # alone: every core
    ({"EDC_JOBS": "2"}, 2, 1),                    # two queue workers on 2 cores: one thread each
    ({"EDC_JOBS": "3"}, 8, 2),                    # rounded down
    ({"EDC_JOBS": "4"}, 2, 1),                    # never below one
    ({"EDC_JOBS": "2", "LOCAL_WORLD_SIZE": "2"}, 8, 2),  # torchrun ranks divide too
    ({"EDC_JOBS": "2", "OMP_NUM_THREADS": "3"}, 8, 3),   # torch's own variable, set by the user, wins
    ({"EDC_THREADS": "5", "OMP_NUM_THREADS": "3", "EDC_JOBS": "2"}, 8, 5),  # and EDC_THREADS over all
])
def test_threads_divide_the_cores_between_side_by_side_runs(env, cores, want):
    assert resolve_threads(env, cores) == want


@pytest.mark.parametrize("name", ["EDC_THREADS", "EDC_JOBS"])
@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_bad_thread_setting_is_one_line_naming_the_variable(name, value):
    with pytest.raises(EdcError, match=f"^environment variable {name}: must be a positive whole number"):
        resolve_threads({name: value}, 4)


def _stage_threads(env: dict) -> subprocess.CompletedProcess:
    """A process that runs a stage's main through edc.stage.stage_main, as every stage script does,
    and prints the thread count its torch has."""
    code = ("import torch; from edc.stage import stage_main; "
            "stage_main(lambda argv: print(torch.get_num_threads(), torch.get_num_interop_threads()))")
    base = {k: v for k, v in os.environ.items() if k not in ("EDC_THREADS", "EDC_JOBS", "OMP_NUM_THREADS")}
    return subprocess.run([sys.executable, "-c", code], env={**base, "PYTHONPATH": str(ROOT), **env},
                          capture_output=True, text=True, timeout=120)


def test_a_stage_process_takes_its_share_of_the_cores(monkeypatch, capsys):
    cores = len(os.sched_getaffinity(0))
    for env, want in (({"EDC_JOBS": str(cores)}, 1), ({"EDC_THREADS": "3"}, 3), ({}, cores)):
        r = _stage_threads(env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [str(want), "1"], env
    # A bad setting stops stage_main before torch's threads are touched: this process can check it.
    from edc.stage import stage_main

    for name in ("EDC_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EDC_JOBS", "x")
    ran = []
    with pytest.raises(SystemExit) as bad:
        stage_main(ran.append, [])
    assert bad.value.code == 2 and not ran and capsys.readouterr().err.strip().splitlines() == [
        "environment variable EDC_JOBS: must be a positive whole number (got 'x')"]


def test_edc_queue_start_gives_the_workers_their_share(monkeypatch, capsys, tmp_path):
    """`edc queue start -j N` runs `dvc queue start -j N` with EDC_JOBS=N in the environment the
    workers inherit (DVC spawns them from that process with its environment)."""
    from edc import cli

    seen = []
    monkeypatch.setattr(cli.subprocess, "run", lambda cmd, env: seen.append((cmd, env)) or
                        subprocess.CompletedProcess(cmd, 0))
    monkeypatch.delenv("EDC_JOBS", raising=False)
    monkeypatch.chdir(tmp_path)  # no queue records here: no killed task to mark failed first
    cli.main(["queue", "start", "-j", "2"])
    (cmd, env), = seen
    assert cmd[1:] == ["queue", "start", "-j", "2"] and env["EDC_JOBS"] == "2"
    assert resolve_threads(env, 2) == 1
    with pytest.raises(SystemExit):
        cli.main(["queue", "start", "-j", "0"])
    assert "argument -j/--jobs: must be an integer >= 1 (got '0')" in capsys.readouterr().err


# --- post_evaluate's seeds side by side ------------------------------------------------------------
# The three tests below run the stage script as processes, seeds in spawned workers (a minute on two
# cores): `pipeline` tests, outside the quick loop, which keeps the unit tests above and the last one.

INPUTS = ("data/prepared", "condensed/shards")
OUTPUTS = ("reports/metrics.json", "reports/plots/evaluate", "reports/plots/accuracy")


@pytest.fixture(scope="module")
def shards(long_workspace, tmp_path_factory) -> Path:
    """post_evaluate's inputs from the session's long workspace (a tiny condensed set whose
    post-evaluation trains two seeds), with an empty MLflow store that each run starts from a copy of:
    creating a store's tables takes seconds, which every run would otherwise spend on its own."""
    work = tmp_path_factory.mktemp("throughput")
    for item in INPUTS:
        shutil.copytree(long_workspace / item, work / item)
    shutil.copy(long_workspace / "params.yaml", work / "params.yaml")
    import mlflow

    mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}").search_experiments()  # creates the tables
    return work


def post_evaluate(shards: Path, dest: Path, eval_jobs: int, wait: bool = True, **env):
    """post_evaluate in a copy of ``shards``'s workspace with ``eval_jobs``, as DVC runs it (its own
    process, its own MLflow store); the finished process, or the running one with ``wait=False``."""
    if not dest.exists():
        dest.mkdir()
        for item in INPUTS:
            shutil.copytree(shards / item, dest / item)
        shutil.copy(shards / "mlflow.db", dest / "mlflow.db")
    p = read_yaml(shards / "params.yaml")
    p["eval_jobs"] = eval_jobs
    write_yaml(dest / "params.yaml", p)
    base = {k: v for k, v in os.environ.items() if k not in ("EDC_THREADS", "EDC_JOBS", "OMP_NUM_THREADS")}
    env = {**base, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{dest}/mlflow.db", **env}
    argv = [a if a.startswith("--") else str(dest / a) for a in ARGS["post_evaluate"]]
    proc = subprocess.Popen([sys.executable, str(ROOT / "stages/post_evaluate.py"), "--params",
                             str(dest / "params.yaml"), *argv], cwd=dest, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def outputs(work: Path) -> dict[str, str]:
    out = {}
    for item in OUTPUTS:
        p = work / item
        out.update({f"{item}/{k}": v for k, v in md5_tree(p).items()} if p.is_dir() else {item: md5_file(p)})
    return out


def seed_runs(work: Path) -> dict[str, tuple[float, int]]:
    """MLflow's child runs of the post_evaluate run: {run name: (final_acc, curve points logged)} (the
    curve's train_loss, one per epoch; the test split is scored once, at the end, and has no curve)."""
    db = sqlite3.connect(work / "mlflow.db")
    rows = db.execute("select r.name, r.run_uuid from runs r join tags t on t.run_uuid = r.run_uuid "
                      "and t.key = 'edc.student'").fetchall()
    out = {}
    for name, run in rows:
        (acc,) = db.execute("select value from latest_metrics where run_uuid = ? and key = 'final_acc'",
                            (run,)).fetchone()
        (points,) = db.execute("select count(*) from metrics where run_uuid = ? and key = 'train_loss'",
                               (run,)).fetchone()
        out[name] = (acc, points)
    return out


@pytest.mark.pipeline
def test_eval_jobs_2_gives_the_results_of_one_process_with_the_same_threads(shards, tmp_path):
    """eval_jobs 2 on 2 threads (one per seed) writes the bytes eval_jobs 1 writes on one thread,
    and MLflow holds each seed's run with its whole curve, logged by the stage's own process."""
    one = post_evaluate(shards, tmp_path / "one", 1, EDC_THREADS="1")
    assert one.returncode == 0, one.stderr
    two = post_evaluate(shards, tmp_path / "two", 2, EDC_THREADS="2")
    assert two.returncode == 0, two.stderr
    assert "2 students/seeds, 2 at a time with 1 thread(s) each" in two.stdout
    assert outputs(tmp_path / "two") == outputs(tmp_path / "one")
    runs = seed_runs(tmp_path / "two")
    assert runs == seed_runs(tmp_path / "one") and sorted(runs) == ["student seed 0", "student seed 1"]
    epochs = read_yaml(shards / "params.yaml")["relabel"]["epochs"]
    assert epochs > 1 and all(points == epochs for _, points in runs.values())  # every epoch's point


@pytest.mark.pipeline
def test_a_killed_parallel_post_evaluate_keeps_its_finished_seeds(shards, tmp_path):
    want = post_evaluate(shards, tmp_path / "clean", 1, EDC_THREADS="1")
    assert want.returncode == 0, want.stderr
    work = tmp_path / "killed"
    r = post_evaluate(shards, work, 2, EDC_THREADS="2", EDC_CRASH_AFTER_CHECKPOINTS="1")
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    assert not (work / "reports/metrics.json").exists()
    r = post_evaluate(shards, work, 2, EDC_THREADS="2")
    assert r.returncode == 0, r.stderr
    assert "resuming (1 students/seeds finished" in r.stdout and "1 students/seeds, 1 at a time" in r.stdout
    assert outputs(work) == outputs(tmp_path / "clean")


@pytest.mark.pipeline
def test_a_run_beside_another_gives_the_results_it_gives_alone(shards, tmp_path):
    """The same post-evaluation with the same thread count, alone and while another process trains
    beside it: the same metrics, curves and plots (side by side changes timing, never results). One
    of them also records its timings (EDC_TIMING_FILE, benchmarks/overhead.py), outside its outputs."""
    alone = post_evaluate(shards, tmp_path / "alone", 1, EDC_THREADS="1")
    assert alone.returncode == 0, alone.stderr
    timing = tmp_path / "timing.jsonl"
    procs = [post_evaluate(shards, tmp_path / f"side{i}", 1, wait=False, EDC_THREADS="1",
                           **({"EDC_TIMING_FILE": str(timing)} if i else {})) for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    want = outputs(tmp_path / "alone")
    assert outputs(tmp_path / "side0") == want and outputs(tmp_path / "side1") == want
    (line,) = [json.loads(x) for x in timing.read_text().splitlines()]
    assert line["stage"] == "post_evaluate.py" and line["pid"] == procs[1].pid
    assert line["process_start"] <= line["main_start"] < line["end"]
    assert 0 < line["loops"] < line["end"] - line["main_start"] and line["mlflow_wait"] >= 0


def test_each_stage_run_records_its_thread_count(_mlflow_store):
    """The thread count can change a result's last bits: MLflow keeps it with the stage's run."""
    import torch

    from edc import tracking

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tracking.stage_run("prepare", {"seed": 0}) as run:
            run.metrics({"x": 1.0})
            run_id = run.run_id
    finally:
        torch.set_num_threads(before)
    # The session's store (creating one of its own would take seconds): this run's tag only.
    db = sqlite3.connect(_mlflow_store.removeprefix("sqlite:///"))
    assert db.execute("select value from tags where key = 'edc.threads' and run_uuid = ?",
                      (run_id,)).fetchall() == [("1",)]


def test_eval_jobs_with_torchrun_ranks_is_a_params_error():
    """Ranks already share each student's batches; processes per seed on top would oversubscribe."""
    from types import SimpleNamespace

    from edc.errors import ParamsError
    from edc.evaluate import Recipe, train_seeds_in_parallel
    from edc.params import parse_params

    cfg = parse_params(tiny_params()).evaluate
    with pytest.raises(ParamsError, match="eval_jobs: 2 trains seeds in parallel processes, but the launcher "
                                          "already runs 2 ranks; set eval_jobs: 1 with torchrun"):
        train_seeds_in_parallel(2, Recipe(cfg, 2.0, world=SimpleNamespace(size=2, main=True)), None, None, None,
                                seed_for=lambda *k: 0, state={"done": {}, "current": None}, ckpt=None)
    assert train_seeds_in_parallel(1, Recipe(cfg, 2.0, world=SimpleNamespace(size=2, main=True)), None, None, None,
                                   seed_for=lambda *k: 0, state={"done": {}, "current": None}, ckpt=None) == set()


def test_the_throughput_benchmark_measures_the_time_experiments_ran_together():
    """benchmarks/throughput.py's seconds with at least one / at least two experiments running,
    against a count over unit cells of random integer intervals."""
    import importlib.util
    import random

    spec = importlib.util.spec_from_file_location("throughput_bench", ROOT / "benchmarks" / "throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = random.Random(0)
    for _ in range(200):
        intervals = [tuple(sorted(rng.sample(range(21), 2))) for _ in range(rng.randint(1, 5))]
        running = [sum(lo <= t < hi for lo, hi in intervals) for t in range(20)]
        assert bench.covered(intervals) == sum(n >= 1 for n in running), intervals
        assert bench.side_by_side(intervals) == sum(n >= 2 for n in running), intervals
    assert bench.side_by_side([(0.0, 10.0), (10.0, 20.0)]) == 0  # one after the other: never together
