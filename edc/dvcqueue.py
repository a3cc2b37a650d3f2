"""DVC's experiment queue, as `edc queue start` reads it: the tasks whose process was killed, and
the control messages left for workers that are gone.

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

import json
import os
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
    is gone, sorted."""
    found = []
    for info in sorted((Path(root) / RUN_DIR).glob("*/*.json")):
        try:
            record = json.loads(info.read_text())
        except (OSError, ValueError):  # being written by a worker right now
            continue
        pid = record.get("pid")
        if info.stem == info.parent.name and record.get("returncode") is None and isinstance(pid, int) \
                and not _exists(pid):
            found.append(info.stem)
    return found


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
