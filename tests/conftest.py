"""Shared fixtures: a throwaway MLflow store, the repository's params, and small real-format data."""

from __future__ import annotations

import copy
import os
import pickle
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edc.io import md5_file
from edc.params import read_yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _mlflow_store(tmp_path_factory):
    """Every test logs to its own session store, never to the project's mlflow.db."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture
def default_params() -> dict:
    return copy.deepcopy(read_yaml(ROOT / "params.yaml"))


def tiny_params() -> dict:
    """The repository's params.yaml shrunk to seconds on a CPU: one small observer, one epoch."""
    p = copy.deepcopy(read_yaml(ROOT / "params.yaml"))
    p["observers"]["models"] = [{"name": "tiny", "arch": "convnet", "kwargs": {"width": 8, "depth": 2,
                                                                               "norm": "batch"}}]
    p["observers"]["epochs"] = 1
    p["observers"]["batch_size"] = 128
    p["ipc"] = 2
    p["init"].update(method="rded", observers=["tiny"], candidates=8, crops=2, factor=2)
    p["synth"].update(observers=["tiny"], iterations=4)
    p["relabel"].update(teachers=["tiny"], epochs=2, batch_size=8, min_steps=0)
    p["dataset"]["val_size"] = 0
    p["evaluate"].update(students=[{"name": "student", "arch": "convnet", "kwargs": {"width": 8, "depth": 2}}],
                         seeds=1, eval_every=1)
    return p


def write_yaml(path: Path, data: dict) -> Path:
    from ruamel.yaml import YAML

    with open(path, "w") as f:
        YAML(typ="safe").dump(data, f)
    return path


# --- running the stages as DVC runs them ------------------------------------------------------------

PIPELINE = ("prepare", "train_observers", "collect_stats", "init", "synthesize", "relabel", "post_evaluate")


def stage(name: str):
    """Stage script ``name``'s ``main``, loaded from stages/ as DVC's ``cmd`` runs it."""
    return runpy.run_path(str(ROOT / "stages" / f"{name}.py"), run_name="edc_test")["main"]


def stage_argv(name: str) -> list[str]:
    """The arguments dvc.yaml's ``cmd:`` gives stage ``name`` (paths relative to the workspace), read
    from dvc.yaml itself so that the tests run the stages exactly as the pipeline does."""
    cmd = shlex.split(read_yaml(ROOT / "dvc.yaml")["stages"][name]["cmd"].replace("${launcher}", "python"))
    script = cmd.index(f"stages/{name}.py")
    return cmd[script + 1:]


ARGS = {name: stage_argv(name) for name in (*PIPELINE, "reference", "continual", "slimming")}


def run_stages(work: Path, params: Path, stages=PIPELINE) -> None:
    """Run ``stages`` in order in workspace ``work`` with the params file ``params``: dvc.yaml's
    arguments, each path placed under ``work``."""
    for name in stages:
        argv = [a if a.startswith("--") else str(work / a) for a in ARGS[name]]
        stage(name)(["--params", str(params), *argv])


def md5_tree(root: Path) -> dict[str, str]:
    """{path relative to ``root``: md5} of every file under ``root``."""
    return {str(f.relative_to(root)): md5_file(f) for f in sorted(root.rglob("*")) if f.is_file()}


def _images(rng, n: int, c: int, h: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, c, h, h), dtype=np.uint8)


def make_cifar10(root: Path, per_class: int = 3, test_per_class: int = 2, seed: int = 0) -> Path:
    """The standard CIFAR-10 python layout: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = [f"class{i}" for i in range(10)]
    for b in range(1, 6):
        labels = list(range(10)) * per_class if b == 1 else [b % 10] * 2
        x = _images(rng, len(labels), 3, 32).reshape(len(labels), -1)
        with open(d / f"data_batch_{b}", "wb") as f:
            pickle.dump({b"data": x, b"labels": labels, b"batch_label": b"batch"}, f)
    labels = list(range(10)) * test_per_class
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": _images(rng, len(labels), 3, 32).reshape(len(labels), -1), b"labels": labels}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in names], b"num_vis": 3072}, f)
    return root


def make_cifar100(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for split, reps in (("train", 2), ("test", 1)):
        labels = list(range(100)) * reps
        with open(d / split, "wb") as f:
            pickle.dump({b"data": _images(rng, len(labels), 3, 32).reshape(len(labels), -1),
                         b"fine_labels": labels, b"coarse_labels": [0] * len(labels)}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i:02d}".encode() for i in range(100)],
                     b"coarse_label_names": [b"x"] * 20}, f)
    return root


def make_imagefolder(root: Path, classes=("cat", "dog", "emu"), n: int = 3, size: int | tuple = 12,
                     mode: str = "RGB", seed: int = 0, ext: str = ".png") -> Path:
    """root/{train,val}/<class>/<i><ext> of random pixels; ``size`` (h, w) pairs cycle over the images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(size, size)] if isinstance(size, int) else list(size)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = sizes[i % len(sizes)]
                shape = (h, w, 3) if mode == "RGB" else (h, w)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / split / c / f"{i}{ext}")
    return root


# --- DVC in a throwaway repository ---------------------------------------------------------------

def sh(cmd: list[str], cwd: Path, env: dict) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


@pytest.fixture
def dvc_repo(tmp_path) -> tuple[Path, dict]:
    return make_dvc_repo(tmp_path)


def make_dvc_repo(tmp_path: Path) -> tuple[Path, dict]:
    """A throwaway git + DVC repository under ``tmp_path`` holding this project's pipeline on tiny
    params, and the environment to run DVC in it."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in ("edc", "stages", "dvc.yaml"):
        src = ROOT / item
        (shutil.copytree(src, repo / item, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy(src, repo / item))
    write_yaml(repo / "params.yaml", tiny_params())
    (repo / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME")}
    # PYTHONPATH: the stages import the copy's edc (the one dvc.yaml hashes), not the editable install's.
    env.update(HOME=str(tmp_path), PATH=f"{Path(sys.executable).parent}:{env['PATH']}", DVC_NO_ANALYTICS="1",
               PYTHONPATH=str(repo),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com")
    sh(["git", "init", "-q", "-b", "main"], repo, env)
    sh(["dvc", "init", "-q"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "init"], repo, env)
    return repo, env


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests first, each in its own xdist group unless it names one (tests sharing
    a module fixture share a group, so one worker builds it): under `make test` (pytest-xdist, --dist
    loadgroup) they start at once on different workers and the quick tests fill in around them,
    instead of two long tests ending up one after the other at the end."""
    slow = [i for i in items if i.get_closest_marker("slow")]
    for n, item in enumerate(slow):
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(f"slow-{n}"))
    items[:] = slow + [i for i in items if not i.get_closest_marker("slow")]
