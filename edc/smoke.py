"""``edc smoke``: the whole pipeline on tiny settings, in a scratch copy, in one to two minutes.

It copies the pipeline (``edc/``, ``stages/``, ``dvc.yaml``) and a shrunken ``params.yaml`` into a
temporary directory, runs ``dvc repro`` there (``dvc init --no-scm``: no git needed, and nothing
of the project's workspace, DVC cache or MLflow store is touched) and prints the student's accuracy.
The settings are far too small to mean anything about the method: the point is to see every stage
run and talk on this machine before starting the real job.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edc.errors import EdcError

COPIED = ("edc", "stages", "dvc.yaml")


def smoke_params(p: dict[str, Any]) -> dict[str, Any]:
    """``p`` (params.yaml as a dict) shrunk to seconds per stage: one small ConvNet observer trained
    one epoch, ipc 1, 20 synthesis iterations, 100 student epochs, one ConvNet student, one seed."""
    p = copy.deepcopy(p)
    p.update(ipc=1, launcher="python")
    p["dataset"].update(val_size=200)
    p["observers"].update(models=[{"name": "convnet", "arch": "convnet",
                                   "kwargs": {"width": 16, "depth": 3, "norm": "batch"}}],
                          epochs=1, batch_size=64)
    p["stats"].update(draws=1)
    p["init"].update(method="real", observers=["convnet"])
    p["synth"].update(observers=["convnet"], iterations=20)
    p["relabel"].update(teachers=["convnet"], epochs=100, min_steps=0, batch_size=10)
    p["evaluate"].update(students=[{"name": "convnet", "arch": "convnet",
                                    "kwargs": {"width": 16, "depth": 3, "norm": "instance"}}],
                         seeds=1, eval_every=50)
    return p


def run_smoke(project: Path, keep: Path | None = None, out=None) -> dict[str, Any]:
    """Run the pipeline of ``project`` on :func:`smoke_params` in a scratch directory (``keep``, or
    a temporary one that is removed afterwards); return the post-evaluation metrics."""
    from ruamel.yaml import YAML

    from edc.params import read_yaml

    out = out or sys.stdout
    dvc = shutil.which("dvc", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if dvc is None:
        raise EdcError("edc smoke: the dvc command is not installed in this environment (make venv installs it)")
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="edc-smoke-"))
    if keep and work.exists() and any(work.iterdir()):
        raise EdcError(f"edc smoke: --keep {work} is not empty; name a new directory")
    work.mkdir(parents=True, exist_ok=True)
    try:
        for item in COPIED:
            src = project / item
            if src.is_dir():
                shutil.copytree(src, work / item, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(src, work / item)
        with open(work / "params.yaml", "w") as f:
            YAML(typ="safe").dump(smoke_params(read_yaml(project / "params.yaml")), f)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "DVC_NO_ANALYTICS": "1",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("DVC_ROOT", None)
        subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=work, env=env, check=True)
        print(f"edc smoke: the whole pipeline on tiny settings in {work} (one to two minutes)", file=out, flush=True)
        t0 = time.monotonic()
        r = subprocess.run([dvc, "repro"], cwd=work, env=env, stdout=out if out is not sys.stdout else None,
                           stderr=subprocess.STDOUT if out is not sys.stdout else None)
        if r.returncode != 0:
            raise EdcError(f"edc smoke: dvc repro failed in {work} (exit status {r.returncode}); its output is above")
        metrics = json.loads((work / "reports/metrics.json").read_text())
        acc = metrics["convnet"]
        print(f"edc smoke: done in {time.monotonic() - t0:.0f} s; ConvNet student trained on the 10-image set: "
              f"{100 * acc['acc_mean']:.1f} % test, {100 * acc['val_acc_mean']:.1f} % validation "
              f"(tiny settings: a check that everything runs, not a result)", file=out, flush=True)
        return metrics
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
