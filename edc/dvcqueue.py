"""DVC's experiment queue, as `edc queue start` reads it: the tasks whose process was killed.

DVC's queue worker runs each experiment as a ``dvc exp exec-run`` process and records it in
``.dvc/tmp/exps/run/<task>/<task>.json`` (``pid``; ``returncode`` null until the worker has waited
for it). The experiment runs in its worker's process group, so killing that group (``kill -9 -PGID``)
kills the worker too: nothing ever records a return code, and ``dvc queue status`` lists the task
as Running for good. Such a task is one whose ``returncode`` is null and whose ``pid`` no longer
exists: while the worker lives, an exited process stays a zombie (it still exists) until the worker
reaps it and writes the return code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RUN_DIR = Path(".dvc/tmp/exps/run")


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
