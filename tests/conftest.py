"""Shared fixtures (a throwaway MLflow store, the repository's params, finished tiny workspaces, a
throwaway DVC repository) and the collection order; the plain helper functions are in tests/helpers.py."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

from edc.params import read_yaml
from tests.helpers import ROOT, make_dvc_repo, run_stages, tiny_params, write_yaml

# The default per-test limit (pyproject's `timeout`) is for a unit test; a `slow` test drives DVC
# through a whole pipeline several times and gets this one instead.
SLOW_TIMEOUT_S = 1800


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


@pytest.fixture
def dvc_repo(tmp_path) -> tuple[Path, dict]:
    return make_dvc_repo(tmp_path)


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory) -> Path:
    """Every stage's output from :func:`tests.helpers.tiny_params`, built once per session (once per
    xdist worker). Tests only read it: each copies it before changing anything."""
    work = tmp_path_factory.mktemp("tiny-workspace")
    run_stages(work, write_yaml(work / "params.yaml", tiny_params()))
    return work


def long_params() -> dict:
    """Tiny params with enough units to interrupt and to deal out over two ranks: 6 synthesis
    iterations in batches of 6 (20 images: 4 batches), 5 relabel epochs of batches of 7 (7, 7, 6:
    uneven shares over 2 ranks) in a label shard each (20 views of 26 bytes fit 600), 2 student seeds."""
    p = tiny_params()
    p["synth"].update(iterations=6, batch_size=6)
    p["relabel"].update(epochs=5, batch_size=7, shard_bytes=600)
    p["evaluate"]["seeds"] = 2
    return p


@pytest.fixture(scope="session")
def long_workspace(tmp_path_factory) -> Path:
    """Every stage's output from :func:`long_params`, built once per session for the resume and
    torchrun suites. Tests only read it: each copies it before changing anything."""
    work = tmp_path_factory.mktemp("long-workspace")
    run_stages(work, write_yaml(work / "params.yaml", long_params()))
    return work


def pytest_configure(config):
    # pytest-xdist registers this marker; without it (`-p no:xdist`, one test file at a time) every
    # grouped test would warn that the marker is unknown.
    config.addinivalue_line("markers", "xdist_group(name): tests that share a worker under --dist loadgroup")


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests first, each in its own xdist group unless it names one (tests sharing
    a module fixture share a group, so one worker builds it): under `make test` (pytest-xdist, --dist
    loadgroup) they start at once on different workers and the quick tests fill in around them,
    instead of two long tests ending up one after the other at the end. A slow test without its own
    timeout gets SLOW_TIMEOUT_S."""
    slow = [i for i in items if i.get_closest_marker("slow")]
    for n, item in enumerate(slow):
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(f"slow-{n}"))
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
    items[:] = slow + [i for i in items if not i.get_closest_marker("slow")]
