"""`edc queue start --watch`: a queue worker that dies while experiments wait is started again, one
line naming it and the reason its log gives; a worker that idled out is not; the watch ends when
nothing is queued or running. DVC's queue is played by files in its formats (edc.dvcqueue)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from edc.dvcqueue import CELERY_DIR, Watch, queued_tasks, running_tasks

CRASH = ("[2026-12-05 17:34:17,677: CRITICAL/MainProcess] Unrecoverable error: JSONDecodeError('Expecting value: "
         "line 1 column 1 (char 0)')\nTraceback (most recent call last):\n  File \"kombu/utils/json.py\", line 9\n")


def _gone_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: its pid exists no more
    return proc.pid


class FakeQueue:
    """A queue's files under ``root``: task messages waiting or taken, results, worker records and
    logs. ``tick()`` (the watch's sleep) lets the live workers take one waiting experiment each and
    finish the ones they hold."""

    def __init__(self, root: Path, queued: int):
        self.celery = root / CELERY_DIR
        for sub in ("broker/in", "broker/processed", "result"):
            (self.celery / sub).mkdir(parents=True)
        for n in range(queued):
            self._message("in", n)
        self.spawned: list[int] = []
        self.ticks = 0

    def _message(self, folder: str, n: int) -> Path:
        msg = self.celery / "broker" / folder / f"{n:08d}_{n:08x}.celery.msg"
        body = [[{"stash_rev": f"{n:040x}", "name": str(n)}], {}, {}]  # run_exp's arguments, as DVC queues them
        msg.write_text(json.dumps({"headers": {"id": f"task-{n}", "task": "run_exp"},
                                   "body": base64.b64encode(json.dumps(body).encode()).decode()}))
        return msg

    def worker(self, num: int, pid: int, returncode: int | None = None, log: str = "") -> None:
        (self.celery / f"dvc-exp-worker-{num}.json").write_text(json.dumps({"pid": pid, "returncode": returncode}))
        with open(self.celery / f"dvc-exp-worker-{num}.out", "a") as f:
            f.write(log)

    def live(self) -> int:
        """How many workers run (this process stands for each)."""
        return sum(json.loads(p.read_text()) == {"pid": os.getpid(), "returncode": None}
                   for p in self.celery.glob("dvc-exp-worker-*.json"))

    def spawn(self, num: int) -> None:
        self.spawned.append(num)
        self.worker(num, os.getpid(), log="[..: INFO/MainProcess] ready.\n")

    def tick(self, _seconds: float) -> None:
        self.ticks += 1
        assert self.ticks < 50, "the watch did not end"
        for msg in self.celery.glob("broker/processed/*.celery.msg"):
            task = json.loads(msg.read_text())["headers"]["id"]
            (self.celery / "result" / f"celery-task-meta-{task}").write_text("{}")
        for msg in sorted(self.celery.glob("broker/in/*.celery.msg"))[:self.live()]:
            msg.rename(self.celery / "broker" / "processed" / msg.name)


def test_a_worker_dead_while_experiments_wait_is_started_again_once_with_its_reason(tmp_path):
    queue = FakeQueue(tmp_path, queued=6)
    queue.worker(1, os.getpid())
    # Worker 2's log holds an earlier worker's exit (before the watch began) and then its own crash.
    queue.worker(2, os.getpid(), log="[..: ERROR/MainProcess] an earlier worker's error\n")
    since = {1: 0, 2: (queue.celery / "dvc-exp-worker-2.out").stat().st_size}
    queue.worker(2, _gone_pid(), returncode=1, log=CRASH)
    lines, tidied = [], []
    watch = Watch(tmp_path, 2, queue.spawn, lambda: tidied.append(1), echo=lines.append, sleep=queue.tick,
                  since=since)
    assert watch.run() == 1
    assert queue.spawned == [2]
    assert lines == ["worker 2 died (Unrecoverable error: JSONDecodeError('Expecting value: line 1 column 1 "
                     "(char 0)')); started again"]
    assert queued_tasks(tmp_path) == 0 and running_tasks(tmp_path) == []
    assert len(tidied) > queue.ticks  # killed tasks marked failed, stale messages dropped, at every poll


def test_a_worker_whose_successor_has_not_written_its_record_is_not_started_twice(tmp_path):
    queue = FakeQueue(tmp_path, queued=2)
    queue.worker(1, os.getpid(), log="[..: CRITICAL/MainProcess] an earlier worker's error\n")
    since = {1: (queue.celery / "dvc-exp-worker-1.out").stat().st_size}  # the log when the watch began
    queue.worker(1, _gone_pid(), returncode=None)  # killed: no return code, no process, no line in its log
    lines = []
    watch = Watch(tmp_path, 1, queue.spawned.append, lambda: None, echo=lines.append, sleep=queue.tick, since=since)
    assert watch.step() == 1 and watch.step() == 0  # its record still names the gone process
    assert queue.spawned == [1] and lines == ["worker 1 died (its process is gone, no error in its log); started "
                                              "again"]
    queue.worker(1, os.getpid())  # the successor started ...
    queue.worker(1, _gone_pid(), returncode=-9)  # ... and died too
    assert watch.step() == 1 and queue.spawned == [1, 1]
    assert lines[-1] == "worker 1 died (exit status -9); started again"


def test_a_worker_that_idled_out_is_not_started_again(tmp_path):
    """Worker 2 exited because nothing was left to take while worker 1 runs the last experiment: the
    watch waits for that one and ends."""
    queue = FakeQueue(tmp_path, queued=0)
    queue._message("processed", 7)  # taken by worker 1, no result yet: Running
    queue.worker(1, os.getpid())
    queue.worker(2, _gone_pid(), returncode=0, log="[..: INFO/MainProcess] monitor: shutting down, empty queue.\n")
    lines = []
    assert Watch(tmp_path, 2, queue.spawn, lambda: None, echo=lines.append, sleep=queue.tick).run() == 0
    assert queue.spawned == [] and lines == [] and queue.ticks == 1


def test_a_task_taken_by_a_worker_killed_before_its_run_started_is_marked_failed_once_no_worker_lives(tmp_path):
    """Running for DVC for good (taken, no result, no process record): `edc queue start` marks it
    failed, but only when no worker lives, since a live one may be setting it up right now."""
    from edc.dvcqueue import killed_tasks

    queue = FakeQueue(tmp_path, queued=0)
    queue._message("processed", 5)
    queue.worker(1, os.getpid())
    queue.worker(2, _gone_pid(), returncode=-9)
    assert running_tasks(tmp_path) == [f"{5:040x}"] and killed_tasks(tmp_path) == []
    queue.worker(1, _gone_pid(), returncode=0)
    assert killed_tasks(tmp_path) == [f"{5:040x}"]


def test_the_watch_ends_at_once_when_nothing_is_queued_or_running(tmp_path):
    queue = FakeQueue(tmp_path, queued=0)
    queue._message("processed", 3)
    (queue.celery / "result" / "celery-task-meta-task-3").write_text("{}")  # finished
    # Control messages (an inspection for worker 1, a reply) are no experiments.
    for name in ("12_ab.dvc-exp-4091e2-1@localhost.celery.pidbox.msg", "13_cd.4f1e.reply.celery.pidbox.msg"):
        (queue.celery / "broker" / "in" / name).write_text("{}")
        (queue.celery / "broker" / "processed" / name).write_text("{}")
    assert Watch(tmp_path, 2, queue.spawn, lambda: None, sleep=queue.tick).run() == 0
    assert queue.ticks == 0


def test_edc_queue_start_watch_keeps_the_thread_split_and_leaves_the_workers_on_ctrl_c(tmp_path, monkeypatch, capsys):
    from edc import cli, dvcqueue

    seen = []
    monkeypatch.setattr(cli.subprocess, "run", lambda cmd, env=None: seen.append((cmd[1:], env)) or
                        subprocess.CompletedProcess(cmd, 0))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("EDC_JOBS", raising=False)

    def interrupted(self):
        assert self.jobs == 2 and self.root == tmp_path
        raise KeyboardInterrupt

    monkeypatch.setattr(dvcqueue.Watch, "run", interrupted)
    cli.main(["queue", "start", "-j", "2", "--watch"])
    ((cmd, env),) = seen
    assert cmd == ["queue", "start", "-j", "2"] and env["EDC_JOBS"] == "2"
    assert "stopped watching; the workers keep running" in capsys.readouterr().out


@pytest.mark.parametrize("watch", [[], ["--watch"]])
def test_edc_queue_start_returns_when_the_queue_is_empty(tmp_path, monkeypatch, capsys, watch):
    from edc import cli

    monkeypatch.setattr(cli.subprocess, "run", lambda cmd, env=None: subprocess.CompletedProcess(cmd, 0))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    t = time.monotonic()
    cli.main(["queue", "start", "-j", "2", *watch])
    assert time.monotonic() - t < 5
    assert ("the queue is empty: nothing queued or running (0 worker(s) started again)" in capsys.readouterr().out) \
        == bool(watch)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["empty control message", "SIGKILL"])
def test_a_worker_that_dies_mid_queue_is_started_again_and_the_queue_drains(dvc_repo, how):
    """Worker 2 dies while experiments wait, either of the race itself, made certain (an empty file in
    its control queue, what kombu's broker leaves readable for an instant, stops it with
    "Unrecoverable error: JSONDecodeError" after its experiment), or killed (SIGKILL to the worker's
    process, not its experiment's: that experiment's result is lost with the worker, and the watch
    marks it failed). `edc queue start -j 2 --watch` starts worker 2 again, the new one takes
    experiments, every other experiment succeeds and the watch ends."""
    import re
    import signal
    import sys
    import uuid

    from tests.helpers import sh, write_yaml

    repo, env = dvc_repo
    # Each experiment sleeps a few seconds, so that some still wait when worker 2 dies.
    write_yaml(repo / "dvc.yaml", {"stages": {"write": {
        "cmd": "python -c \"import time, yaml; time.sleep(4); "
               "open('out.txt', 'w').write(str(yaml.safe_load(open('params.yaml'))['a']))\"",
        "params": ["a"], "outs": ["out.txt"]}}})
    write_yaml(repo / "params.yaml", {"a": 0})
    sh(["dvc", "repro", "-q"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "baseline"], repo, env)
    names = [str(n) for n in range(1, 9)]
    for name in names:
        sh(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"a={name}"], repo, env)
    celery = repo / CELERY_DIR
    out2 = celery / "dvc-exp-worker-2.out"
    log = repo.parent / "watch.log"
    with open(log, "w") as f:
        # The workers DVC spawns inherit stdout: a file, not a pipe that would stay open after the watch.
        watch = subprocess.Popen([sys.executable, "-m", "edc.cli", "queue", "start", "-j", "2", "--watch"],
                                 cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (out2.exists() and " received" in out2.read_text()):  # worker 2 holds an experiment
            assert time.monotonic() < deadline and watch.poll() is None, log.read_text()
            time.sleep(0.5)
        if how == "SIGKILL":
            os.kill(json.loads((celery / "dvc-exp-worker-2.json").read_text())["pid"], signal.SIGKILL)
        else:
            node = re.search(r"dvc-exp-\w+-2@localhost", out2.read_text()).group(0)
            (celery / "broker" / "in" / f"{int(time.monotonic() * 1000)}_{uuid.uuid4()}.{node}.celery.pidbox.msg"
             ).touch()
        watch.wait(timeout=600)
    finally:
        if watch.poll() is None:
            watch.kill()
    text = log.read_text()
    assert watch.returncode == 0, text
    reason = "exit status -9" if how == "SIGKILL" else \
        "Unrecoverable error: JSONDecodeError('Expecting value: line 1 column 1 (char 0)')"
    assert f"worker 2 died ({reason}); started again" in text, text
    started = out2.read_text().split("ready.")
    assert len(started) == 3 and " succeeded in " in started[2], out2.read_text()  # the new worker 2 ran some
    status = [line.split() for line in sh(["dvc", "queue", "status"], repo, env).splitlines()]
    done = {cols[1]: cols[-1] for cols in status if len(cols) >= 4 and cols[-1] in ("Success", "Failed")}
    # The experiment worker 2 held when it was killed is lost, unless its own process had already started:
    # that process outlives the worker and finishes (which of the two happens depends on timing).
    lost = 1 if how == "SIGKILL" else 0
    assert sorted(done) == sorted(names) and list(done.values()).count("Failed") <= lost, status
    sh(["dvc", "queue", "stop"], repo, env)  # the workers, before the repository goes
