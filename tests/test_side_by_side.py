"""Two queued experiments side by side (`edc queue start -j 2`), one of them killed mid-stage: the
other loses nothing, and the killed one, queued again as docs/reliability.md says, gives the bytes
of an uninterrupted run; `edc queue start` marks failed a task killed with its worker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from edc.io import md5_file
from edc.params import read_yaml
from edc.restore import uncached_outs
from tests.helpers import PIPELINE, sh, write_yaml

# Two points that differ in a relabel key: each experiment makes its own condensed set (relabel) and
# trains its students on it (post_evaluate); everything upstream is the baseline's.
POINTS = {"a": "relabel.aug.scale_min=0.25", "b": "relabel.aug.scale_min=0.5"}
KILLED = "b"
STAGES = ("relabel", "post_evaluate")


def _stage_processes(repo: Path) -> dict[str, list[tuple[int, Path, str]]]:
    """{experiment name: [(pid, working directory, stage script)]} of the stage scripts DVC runs for
    ``repo``'s experiments (their working directories are the executors' copies under
    ``repo/.dvc/tmp/exps``)."""
    found: dict[str, list[tuple[int, Path, str]]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(proc / "cwd"))
            if repo / ".dvc" not in cwd.parents:
                continue
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            environ = dict(v.split(b"=", 1) for v in (proc / "environ").read_bytes().split(b"\0") if b"=" in v)
        except OSError:  # gone meanwhile, or another user's
            continue
        name = environ.get(b"DVC_EXP_NAME", b"").decode()
        scripts = [a.decode() for a in argv if a.startswith(b"stages/")]
        if name and scripts:
            found.setdefault(name, []).append((int(proc.name), cwd, scripts[0]))
    return found


def _tasks(repo: Path, env: dict) -> list[tuple[str, str, str]]:
    """(task id, name, status) of each task `dvc queue status` lists."""
    lines = sh(["dvc", "queue", "status"], repo, env).splitlines()
    return [(cols[0], cols[1], cols[-1]) for cols in (line.split() for line in lines[1:])
            if len(cols) >= 4 and cols[0] != "Worker"]


def _queue(repo: Path, env: dict) -> list[tuple[str, str]]:
    """(name, status) of each task `dvc queue status` lists."""
    return [(name, status) for _, name, status in _tasks(repo, env)]


def _wait_queue(repo: Path, env: dict, done, timeout_s: float = 600) -> list[tuple[str, str]]:
    deadline = time.monotonic() + timeout_s
    while not done(status := _queue(repo, env)):
        assert time.monotonic() < deadline, status
        time.sleep(2)
    return status


def _start_queue(repo: Path, env: dict, jobs: int, log: Path) -> None:
    # The workers DVC spawns inherit this command's stdout: a pipe would keep it waiting until they exit.
    with open(log, "a") as f:
        subprocess.run([sys.executable, "-m", "edc.cli", "queue", "start", "-j", str(jobs)], cwd=repo, env=env,
                       stdout=f, stderr=subprocess.STDOUT, check=True, timeout=120)


def _shown(repo: Path, env: dict, name: str) -> dict:
    """`dvc exp show`'s entry for the finished experiment ``name`` (a failed one of that name is listed too)."""
    found = [exp["revs"][0] for baseline in json.loads(sh(["dvc", "exp", "show", "--json"], repo, env))
             for exp in baseline.get("experiments") or [] if exp["revs"][0]["name"] == name
             and not exp["revs"][0].get("error")]
    assert len(found) == 1, f"dvc exp show lists {len(found)} finished experiments named {name}"
    return found[0]


def _outs(repo: Path, env: dict, rev: str) -> dict[str, tuple[str, int]]:
    """{path: (md5, size)} of every output dvc.lock records at ``rev`` for the stages the points rerun:
    the condensed set and the students' metrics and curves."""
    lock = YAML(typ="safe").load(sh(["git", "show", f"{rev}:dvc.lock"], repo, env))
    return {o["path"]: (o["md5"], o["size"]) for s in STAGES for o in lock["stages"][s]["outs"]}


def _not_in_cache(repo: Path, env: dict, rev: str) -> list[str]:
    """The cached outputs dvc.lock records at ``rev`` for the points' stages (and each file of a
    directory output) that the cache lacks or holds with other bytes."""
    objects = repo / ".dvc/cache/files/md5"
    dvc_yaml = read_yaml(repo / "dvc.yaml")
    uncached = {path for stage in STAGES for path in uncached_outs(dvc_yaml, stage)}
    bad = []
    for path, (md5, _) in _outs(repo, env, rev).items():
        obj = objects / md5[:2] / md5[2:]
        if path in uncached:
            continue
        if not obj.is_file():
            bad.append(path)
        elif md5.endswith(".dir"):
            bad += [f"{path}/{e['relpath']}" for e in json.loads(obj.read_text())
                    if md5_file(objects / e["md5"][:2] / e["md5"][2:]) != e["md5"]]
        elif md5_file(obj) != md5:
            bad.append(path)
    return bad


def _mlflow_status(repo: Path, name: str) -> dict[str, set[str]]:
    """{stage (or "pipeline"): statuses} of experiment ``name``'s MLflow runs in the repository's store."""
    db = sqlite3.connect(repo / "mlflow.db")
    rows = db.execute("select coalesce(s.value, 'pipeline'), r.status from runs r join tags e on e.run_uuid = "
                      "r.run_uuid and e.key = 'dvc.exp_name' left join tags s on s.run_uuid = r.run_uuid and "
                      "s.key = 'edc.stage' where e.value = ?", (name,)).fetchall()
    db.close()
    out: dict[str, set[str]] = {}
    for stage, status in rows:
        out.setdefault(stage, set()).add(status)
    return out


@pytest.mark.slow
@pytest.mark.pipeline
def test_killing_one_of_two_side_by_side_experiments_loses_nothing_of_the_other(dvc_repo):
    repo, env = dvc_repo
    # The seven stages only: the disabled applications' stub stages would add processes, not coverage.
    dvc_yaml = read_yaml(repo / "dvc.yaml")
    dvc_yaml["stages"] = {k: v for k, v in dvc_yaml["stages"].items() if k in PIPELINE}
    apps = {"continual_accuracy", "slimming_accuracy"}
    dvc_yaml["plots"] = [p for p in dvc_yaml.get("plots") or [] if not apps & set(p)]
    write_yaml(repo / "dvc.yaml", dvc_yaml)
    # Eight planned epochs, each ending in a checkpoint: post_evaluate stays long enough, after its
    # first one, for the kill to land inside it.
    params = read_yaml(repo / "params.yaml")
    params["relabel"]["epochs"] = 8
    write_yaml(repo / "params.yaml", params)
    # A checkpoint at every epoch, so that the kill lands in a stage that has saved state.
    env = {**env, "EDC_THREADS": "1", "EDC_CHECKPOINT_SECONDS": "0"}
    sh(["dvc", "repro"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "baseline"], repo, env)
    log = repo.parent / "queue.log"

    for name, setting in POINTS.items():
        sh(["dvc", "exp", "run", "--queue", "-n", name, "-S", setting], repo, env)
    _start_queue(repo, env, 2, log)
    killed_at, other_after, evaluating = None, False, False
    deadline = time.monotonic() + 600
    while not other_after:
        assert time.monotonic() < deadline, _queue(repo, env)
        running = _stage_processes(repo)
        if killed_at is None:
            stage = [(pid, cwd) for pid, cwd, script in running.get(KILLED, []) if script == "stages/post_evaluate.py"]
            assert stage or not evaluating, "the experiment to kill finished its last stage before the kill"
            evaluating = bool(stage)
            for pid, cwd in stage:
                if (cwd / "reports/.metrics.json.resume/state.pt").exists():  # inside post_evaluate, mid-way
                    os.killpg(os.getpgid(pid), signal.SIGKILL)  # the stage, DVC's executor and its queue worker
                    killed_at = time.monotonic()
                    break
        elif "a" in running:
            other_after = True  # a stage of the other ran after the kill: they did run side by side
        elif ("a", "Success") in _queue(repo, env):
            break
        time.sleep(0.05)
    assert killed_at is not None and other_after, "the other experiment had finished before the kill"

    # (a), (b): the other finishes. The killed one's worker died with it, so DVC lists it as running.
    status = _wait_queue(repo, env, lambda s: ("a", "Success") in s)
    assert (KILLED, "Running") in status, status
    a_shown = _shown(repo, env, "a")
    side_by_side = _outs(repo, env, a_shown["rev"])
    metrics = a_shown["data"]["metrics"]["reports/metrics.json"]["data"]
    assert metrics == json.loads(sh(["git", "show", f"{a_shown['rev']}:reports/metrics.json"], repo, env))
    assert _mlflow_status(repo, "a") == {s: {"FINISHED"} for s in (*STAGES, "pipeline")}
    assert _not_in_cache(repo, env, a_shown["rev"]) == []

    # (c): queued again with the same command; `edc queue start` marks the killed task failed and runs
    # the new one, which finishes.
    sh(["dvc", "exp", "run", "--queue", "-n", KILLED, "-S", POINTS[KILLED]], repo, env)
    _start_queue(repo, env, 1, log)
    assert "its process is gone (killed); marking it failed" in log.read_text()
    status = _wait_queue(repo, env, lambda s: not {"Queued", "Running"} & {st for _, st in s})
    assert (KILLED, "Failed") in status and (KILLED, "Success") in status, status
    rerun_rev = _shown(repo, env, KILLED)["rev"]
    # The stage it finished before the kill comes back from the run-cache; the killed stage starts over.
    (task,) = [t for t, name, st in _tasks(repo, env) if (name, st) == (KILLED, "Success")]
    rerun_log = sh(["dvc", "queue", "logs", task], repo, env)
    assert "Stage 'relabel' is cached - skipping run" in rerun_log, rerun_log
    assert "Running stage 'post_evaluate'" in rerun_log, rerun_log
    rerun = _outs(repo, env, rerun_rev)
    assert _not_in_cache(repo, env, rerun_rev) == []
    assert "FINISHED" in _mlflow_status(repo, KILLED)["post_evaluate"]
    sh(["dvc", "queue", "stop"], repo, env)  # the idle worker, before the repository goes

    # The same two experiments, each alone and uninterrupted, with the run-cache emptied so that
    # DVC computes them instead of restoring the outputs computed above.
    shutil.rmtree(repo / ".dvc/cache/runs")
    alone = {}
    for name, setting in POINTS.items():
        sh(["dvc", "exp", "run", "--temp", "-n", f"{name}-alone", "-S", setting], repo, env)
        alone[name] = _outs(repo, env, _shown(repo, env, f"{name}-alone")["rev"])
    assert side_by_side == alone["a"]
    assert rerun == alone[KILLED]
    assert alone["a"] != alone[KILLED]  # two different sets: the comparisons above can tell them apart
    # Applied, the other's experiment checks out of the cache into the workspace as its dvc.lock records.
    sh(["dvc", "exp", "apply", "a"], repo, env)
    assert "Data and pipelines are up to date." in sh(["dvc", "status"], repo, env)


def test_edc_queue_start_marks_failed_a_task_killed_with_its_worker(tmp_path, monkeypatch, capsys):
    """A task DVC records as running (no return code) whose process no longer exists is marked failed
    by `dvc queue kill` before the workers start; a running, a finished and an already-failed one are
    left alone."""
    from edc import cli
    from edc.dvcqueue import RUN_DIR, killed_tasks

    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid exists no more
    records = {"a" * 40: {"pid": gone.pid, "returncode": None},  # killed with its worker
               "b" * 40: {"pid": os.getpid(), "returncode": None},  # running
               "c" * 40: {"pid": gone.pid, "returncode": 0},  # finished
               "d" * 40: {"pid": gone.pid, "returncode": -1}}  # marked failed already
    for task, record in records.items():
        (tmp_path / RUN_DIR / task).mkdir(parents=True)
        (tmp_path / RUN_DIR / task / f"{task}.json").write_text(json.dumps(record))
    (tmp_path / RUN_DIR / ("e" * 40)).mkdir()  # a task being set up: no record yet
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)  # the project is the directory holding .dvc/
    assert killed_tasks() == ["a" * 40]

    seen = []
    monkeypatch.setattr(cli.subprocess, "run", lambda cmd, env=None: seen.append(cmd[1:]) or
                        subprocess.CompletedProcess(cmd, 0))
    cli.main(["queue", "start", "-j", "1"])
    assert seen == [["queue", "kill", "a" * 40], ["queue", "start", "-j", "1"]]
    assert "aaaaaaa: listed as running, but its process is gone (killed); marking it failed" in capsys.readouterr().out


def _broker_message(celery: Path, queue: str, n: int) -> Path:
    msg = celery / "broker" / "in" / f"{n:08d}_{n:08x}-0000.{queue}.msg"
    msg.parent.mkdir(parents=True, exist_ok=True)
    msg.write_text("{}")
    return msg


def test_edc_queue_start_drops_control_messages_left_for_workers_that_are_gone(tmp_path, monkeypatch, capsys):
    """The broker's control messages for a worker number whose process is gone (exited, killed, or
    never recorded) are deleted before the workers start; a running worker's, and the queued
    experiments' task messages, stay."""
    from edc import cli
    from edc.dvcqueue import CELERY_DIR, stale_control_messages

    celery = tmp_path / CELERY_DIR
    gone = subprocess.Popen(["true"])
    gone.wait()
    workers = {1: {"pid": os.getpid(), "returncode": None},  # running
               2: {"pid": gone.pid, "returncode": 0},  # idled out
               3: {"pid": gone.pid, "returncode": None}}  # killed
    celery.mkdir(parents=True)
    for num, record in workers.items():
        (celery / f"dvc-exp-worker-{num}.json").write_text(json.dumps(record))
    keep = [_broker_message(celery, "dvc-exp-4091e2-1@localhost.celery.pidbox", 1),
            _broker_message(celery, "celery", 2)]  # a queued experiment
    stale = [_broker_message(celery, f"dvc-exp-4091e2-{num}@localhost.celery.pidbox", 10 + num) for num in (2, 3, 11)]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert stale_control_messages(tmp_path) == stale

    seen = []
    monkeypatch.setattr(cli.subprocess, "run", lambda cmd, env=None: seen.append(cmd[1:]) or
                        subprocess.CompletedProcess(cmd, 0))
    cli.main(["queue", "start", "-j", "2"])
    assert seen == [["queue", "start", "-j", "2"]]
    assert sorted((celery / "broker" / "in").iterdir()) == sorted(keep)
    assert "dropped 3 control message(s)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_queue_stop_sent_to_idle_workers_does_not_stop_the_next_start(dvc_repo):
    """`dvc queue stop` after the workers idled out leaves a shutdown in each worker's control queue
    (edc.dvcqueue); `edc queue start -j 2` drops it, so both new workers keep taking experiments until
    the queue is empty (before, each ran one and exited, and the rest stayed queued for good)."""
    from edc.dvcqueue import stale_control_messages

    repo, env = dvc_repo
    write_yaml(repo / "dvc.yaml", {"stages": {"write": {
        "cmd": "python -c \"import yaml; open('out.txt', 'w').write(str(yaml.safe_load(open('params.yaml'))['a']))\"",
        "params": ["a"], "outs": ["out.txt"]}}})
    write_yaml(repo / "params.yaml", {"a": 0})
    sh(["dvc", "repro", "-q"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "baseline"], repo, env)
    log = repo.parent / "queue.log"

    def run(names: list[str]) -> list[tuple[str, str]]:
        for name in names:
            sh(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"a={name}"], repo, env)
        _start_queue(repo, env, 2, log)
        # Before the fix, two of four stayed Queued with no worker left: this wait ran out.
        status = _wait_queue(repo, env, lambda s: not {"Queued", "Running"} & {st for _, st in s}, timeout_s=300)
        deadline = time.monotonic() + 120
        while "Worker status: 0 active, 0 idle" not in sh(["dvc", "queue", "status"], repo, env):
            assert time.monotonic() < deadline, "the workers did not idle out"  # DVC's idle timeout is 10 s
            time.sleep(2)
        return status

    assert sorted(run(["1", "2"])) == [("1", "Success"), ("2", "Success")]
    sh(["dvc", "queue", "stop"], repo, env)  # no worker left to read it
    assert stale_control_messages(repo), "DVC's broker holds no message for the gone workers: edc.dvcqueue is stale"
    status = run(["3", "4", "5", "6"])
    assert sorted(s for s in status if s[0] in "3456") == [(n, "Success") for n in "3456"], status
    assert "dropped" in log.read_text()
