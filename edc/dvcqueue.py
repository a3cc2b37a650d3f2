"""DVC's experiment queue, as `edc queue start` reads it: the tasks whose process was killed, the
control messages left for workers that are gone, and (``--watch``) what is queued or running and
which workers died.

DVC's queue worker runs each experiment as a ``dvc exp exec-run`` process and records it in
``.dvc/tmp/exps/run/<task>/<task>.json`` (``pid``; ``returncode`` null until the worker has waited
for it). The experiment runs in its worker's process group, so killing that group (``kill -9 -PGID``)
kills the worker too: nothing ever records a return code, and ``dvc queue status`` lists the task
as Running for good. Such a task is one whose ``returncode`` is null and whose ``pid`` no longer
exists: while the worker lives, an exited process stays a zombie (it still exists) until the worker
reaps it and writes the return code.

Workers take their orders through a broker of files, ``.dvc/tmp/exps/celery/broker/in/``, one file
per message, named ``<n>_<id>.<queue>.msg`` (kombu's filesystem transport, which finds a queue's
messages by that name). Each worker node, ``dvc-exp-<hash>-<N>@localhost``, has a control queue
``<node>.celery.pidbox``, kept after the worker exits, and a broadcast (``dvc queue stop``'s
shutdown, ``dvc queue status``'s inspections) lands in every node's queue. Nobody reads the queue of
a worker that is gone, so a ``dvc queue stop`` sent after the workers idled out waits there; worker N
of the next ``dvc queue start`` takes the same node name, reads the old shutdown at once, runs the
one experiment it already holds and exits: ``-j 2`` then runs the rest one at a time. Worker N's
process is recorded in ``.dvc/tmp/exps/celery/dvc-exp-worker-<N>.json`` (``pid``; ``returncode``
once it exited).
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

RUN_DIR = Path(".dvc/tmp/exps/run")
CELERY_DIR = Path(".dvc/tmp/exps/celery")


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process holds the pid: it exists
        return True
    return True


def killed_tasks(root: str | Path = ".") -> list[str]:
    """The task ids (stash revisions) DVC lists as running in the project at ``root`` whose process
    is gone, sorted; with no worker alive, also those a worker took and died with before it started
    their process (no record: killed mid-setup, nothing will ever run or finish them)."""
    found = [] if _live_workers(Path(root) / CELERY_DIR) else \
        [rev for _, rev in _taken(root) if not (Path(root) / RUN_DIR / rev / f"{rev}.json").exists()]
    for info in sorted((Path(root) / RUN_DIR).glob("*/*.json")):
        try:
            record = json.loads(info.read_text())
        except (OSError, ValueError):  # being written by a worker right now
            continue
        pid = record.get("pid")
        if info.stem == info.parent.name and record.get("returncode") is None and isinstance(pid, int) \
                and not _exists(pid):
            found.append(info.stem)
    return sorted(found)


def _live_workers(celery: Path) -> set[str]:
    """The numbers N of the workers whose process is running."""
    live = set()
    for info in celery.glob("dvc-exp-worker-*.json"):
        try:
            record = json.loads(info.read_text())
        except (OSError, ValueError):  # being written by a worker starting right now: count it as live
            live.add(info.stem.rsplit("-", 1)[1])
            continue
        pid = record.get("pid")
        if record.get("returncode") is None and isinstance(pid, int) and _exists(pid):
            live.add(info.stem.rsplit("-", 1)[1])
    return live


def stale_control_messages(root: str | Path = ".") -> list[Path]:
    """The broker's control messages, in the project at ``root``, waiting for a worker whose process
    is gone (module docstring), sorted; task messages (the queued experiments) are never among them."""
    celery = Path(root) / CELERY_DIR
    live = _live_workers(celery)
    found = []
    for msg in sorted((celery / "broker" / "in").glob("*.celery.pidbox.msg")):
        node = msg.name.split(".", 1)[1].removesuffix(".celery.pidbox.msg")  # dvc-exp-<hash>-<N>@localhost
        if node.endswith("@localhost") and node.removesuffix("@localhost").rsplit("-", 1)[-1] not in live:
            found.append(msg)
    return found


# --- watching a queue drain (`edc queue start --watch`) -------------------------------------------
# A worker also dies of a race in kombu's filesystem broker: a message's file is created empty and
# only then locked and written, while a reader moves and reads it without a lock, so a worker polling
# its control queue can read b"" and stop with "Unrecoverable error: JSONDecodeError('Expecting value:
# line 1 column 1 (char 0)')" after finishing its experiment (docs/performance.md). The watch reads
# the queue's files only: asking the workers (`dvc queue status`, `dvc queue start`) broadcasts into
# every control queue, which is the race's trigger.

_LOG_LINE = re.compile(r"^\[[^\]]*: (CRITICAL|ERROR)/[^\]]*\] (.*)$")


def _task_messages(folder: Path) -> list[Path]:
    """The messages of DVC's task queue (named ``celery``) in a broker folder, sorted; kombu's own
    match, so a control queue's ``<node>.celery.pidbox`` is not among them."""
    return sorted(msg for msg in folder.glob("*.msg") if msg.name.partition(".")[2] == "celery.msg")


def queued_tasks(root: str | Path = ".") -> int:
    """How many experiments wait in the broker for a worker (task messages in ``broker/in``)."""
    return len(_task_messages(Path(root) / CELERY_DIR / "broker" / "in"))


def _taken(root: str | Path) -> list[tuple[str, str]]:
    """(Celery id, stash revision) of each experiment a worker took that has no result yet: what
    `dvc queue status` lists as Running (a taken message moves to ``broker/processed``, its body the
    base64 JSON of run_exp's arguments; the result backend writes ``result/celery-task-meta-<id>``
    when the experiment ends or is marked failed)."""
    celery = Path(root) / CELERY_DIR
    found = []
    for msg in _task_messages(celery / "broker" / "processed"):
        try:
            message = json.loads(msg.read_text())
            task, rev = message["headers"]["id"], json.loads(base64.b64decode(message["body"]))[0][0]["stash_rev"]
        except (OSError, ValueError, KeyError, TypeError, IndexError):  # being moved or written right now
            continue
        if not (celery / "result" / f"celery-task-meta-{task}").exists():
            found.append((task, rev))
    return found


def running_tasks(root: str | Path = ".") -> list[str]:
    """The stash revisions of the experiments `dvc queue status` lists as Running, sorted."""
    return sorted(rev for _, rev in _taken(root))


def worker_record(root: str | Path, num: int) -> dict | None:
    """Worker ``num``'s process record (``pid``, ``returncode``), None while it has none (not
    spawned yet, or being written)."""
    try:
        return json.loads((Path(root) / CELERY_DIR / f"dvc-exp-worker-{num}.json").read_text())
    except (OSError, ValueError):
        return None


def is_gone(record: dict | None) -> bool:
    """Whether the worker process a record describes has exited (a missing record is a worker being
    spawned, not a gone one)."""
    if record is None:
        return False
    pid = record.get("pid")
    return record.get("returncode") is not None or not (isinstance(pid, int) and _exists(pid))


def log_size(root: str | Path, num: int) -> int:
    """The size of worker ``num``'s log (``dvc-exp-worker-<num>.out``, appended to by each worker of
    that number), 0 without one."""
    try:
        return (Path(root) / CELERY_DIR / f"dvc-exp-worker-{num}.out").stat().st_size
    except OSError:
        return 0


def death_reason(root: str | Path, num: int, since: int, record: dict | None) -> str:
    """Why worker ``num`` stopped, from what its log gained after byte ``since``: the last error or
    critical line (a traceback's first line), else a remote shutdown, else its exit status."""
    try:
        with open(Path(root) / CELERY_DIR / f"dvc-exp-worker-{num}.out", "rb") as f:
            f.seek(since)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in reversed(lines):
        if (m := _LOG_LINE.match(line)) or "Got shutdown from remote" in line:
            return m.group(2) if m else "Got shutdown from remote"
    code = (record or {}).get("returncode")
    return f"exit status {code}" if code is not None else "its process is gone, no error in its log"


@dataclass
class Watch:
    """`edc queue start --watch`'s loop over the queue at ``root`` with worker numbers 1..``jobs``.
    The callables are the side effects, so that a test can stand in for DVC: ``spawn(num)`` starts
    worker ``num``; ``tidy()`` marks killed tasks failed and drops stale control messages."""

    root: Path
    jobs: int
    spawn: Callable[[int], None]
    tidy: Callable[[], None]
    echo: Callable[[str], None] = print
    sleep: Callable[[float], None] = time.sleep
    interval: float = 2.0
    since: dict[int, int] = field(default_factory=dict)  # each worker's log size when it was started
    replacing: dict[int, object] = field(default_factory=dict)  # num -> the gone pid it replaces

    def step(self) -> int:
        """Replace each gone worker while experiments are queued; the number replaced."""
        if not queued_tasks(self.root):
            return 0
        replaced = 0
        for num in range(1, self.jobs + 1):
            record = worker_record(self.root, num)
            # Until the new process writes its record, the old one still says gone.
            if not is_gone(record) or self.replacing.get(num, object()) == (record or {}).get("pid"):
                continue
            reason = death_reason(self.root, num, self.since.get(num, 0), record)
            self.since[num] = log_size(self.root, num)
            self.replacing[num] = (record or {}).get("pid")
            self.spawn(num)
            self.echo(f"worker {num} died ({reason}); started again")
            replaced += 1
        return replaced

    def run(self) -> int:
        """Until no experiment is queued or running, every ``interval`` seconds: tidy (before a
        replacement, so that a `dvc queue stop` left for the gone worker cannot stop its successor at
        once), then replace gone workers; the number of workers replaced."""
        replaced = 0
        while True:
            self.tidy()
            if not queued_tasks(self.root) and not running_tasks(self.root):
                return replaced
            replaced += self.step()
            self.sleep(self.interval)
