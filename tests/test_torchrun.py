"""The stages under `torchrun --nproc_per_node 2` (gloo, CPU).

synthesize and relabel deal out their work and give the bytes of one process. train_observers and
post_evaluate train with DistributedDataParallel, each rank on its share of every batch: a model
without BatchNorm then trains as in one process, up to float rounding."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edc.io import read_json
from tests.conftest import ROOT, read_yaml, tiny_params, write_yaml
from tests.test_bad_inputs import ARGS
from tests.test_pipeline import md5_tree, run_stages

OUTPUTS = {"synthesize": ["condensed/images", "reports/synth.json", "reports/plots/synth_loss.csv",
                          "reports/synth_grid.png"],
           "relabel": ["condensed/shards"]}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("torchrun")
    p = tiny_params()
    p["synth"]["batch_size"] = 6  # 20 images -> 4 synthesis batches to deal out
    p["relabel"]["epochs"] = 5
    p["relabel"]["batch_size"] = 7  # 20 images -> batches of 7, 7, 6: uneven shares over 2 ranks
    run_stages(work, write_yaml(work / "params.yaml", p))
    return work


def launch(work: Path, stage: str, nproc: int) -> None:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*launcher, str(ROOT / "stages" / f"{stage}.py"), "--params", "params.yaml", *ARGS[stage]],
                       cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def outputs(work: Path, stage: str) -> dict[str, str]:
    tree = md5_tree(work)
    return {k: v for k, v in tree.items() if any(k.startswith(o) for o in OUTPUTS[stage])}


@pytest.mark.parametrize("stage", ["synthesize", "relabel"])
def test_two_ranks_write_what_one_process_writes(finished, tmp_path, stage):
    results = {}
    for nproc in (1, 2):
        work = tmp_path / f"n{nproc}"
        shutil.copytree(finished, work)
        for o in OUTPUTS[stage]:
            (shutil.rmtree if (work / o).is_dir() else os.remove)(work / o)
        launch(work, stage, nproc)
        results[nproc] = outputs(work, stage)
        assert not [x.name for x in (work / OUTPUTS[stage][0]).parent.iterdir() if x.name.startswith(".")]
    assert results[1] == results[2] and len(results[1]) >= 4


def fresh_copy(finished: Path, work: Path, outputs: list[str], **params) -> Path:
    shutil.copytree(finished, work)
    for o in outputs:
        (shutil.rmtree if (work / o).is_dir() else os.remove)(work / o)
    p = read_yaml(work / "params.yaml")
    for section, values in params.items():
        p[section].update(values)
    write_yaml(work / "params.yaml", p)
    return work


def test_observers_train_together_under_ddp(finished, tmp_path):
    flat = {"name": "flat", "arch": "convnet", "kwargs": {"width": 8, "depth": 2, "norm": "instance"}}
    tiny = read_yaml(finished / "params.yaml")["observers"]["models"][0]  # has BatchNorm
    out = ["models/observers", "reports/observers.json", "reports/plots/observers"]
    runs = {}
    for nproc in (1, 2):
        work = fresh_copy(finished, tmp_path / f"n{nproc}", out, observers={"models": [tiny, flat], "batch_size": 97})
        launch(work, "train_observers", nproc)
        runs[nproc] = work
    one, two = (read_json(runs[n] / "reports/observers.json") for n in (1, 2))
    assert sorted(two) == ["flat", "tiny"] and all(0 <= two[k]["test_acc"] <= 1 for k in two)
    # Without BatchNorm, DDP's averaged gradient is the whole batch's: the training of one process, up
    # to float rounding (40 SGD steps with momentum grow it to ~1e-3 in the weights; a rank training
    # on its half alone, or unweighted uneven shares, moves the loss in the third digit).
    w1, w2 = (load_file(str(runs[n] / "models/observers/flat.safetensors")) for n in (1, 2))
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=0, atol=5e-3), k
    (loss1, acc1), (loss2, acc2) = ([float(v) for v in (runs[n] / "reports/plots/observers/flat.csv").read_text()
                                     .splitlines()[1].split(",")[1:3]] for n in (1, 2))
    assert loss2 == pytest.approx(loss1, rel=1e-4) and abs(acc1 - acc2) <= 0.001
    assert abs(one["flat"]["test_acc"] - two["flat"]["test_acc"]) <= 0.002
    # With BatchNorm each rank normalises its own half: a different, equally valid training run.
    assert set(load_file(str(runs[2] / "models/observers/tiny.safetensors"))) == \
        set(load_file(str(runs[1] / "models/observers/tiny.safetensors")))


def test_students_train_together_under_ddp(finished, tmp_path):
    out = ["reports/metrics.json", "reports/plots/evaluate"]
    runs = {}
    for nproc in (1, 2):
        work = fresh_copy(finished, tmp_path / f"n{nproc}", out)
        launch(work, "post_evaluate", nproc)
        runs[nproc] = work
        assert not [x.name for x in (work / "reports").iterdir() if x.name.startswith(".")]  # no checkpoint left
    one, two = (read_json(runs[n] / "reports/metrics.json") for n in (1, 2))
    assert sorted(one) == sorted(two) == ["student"]
    assert abs(one["student"]["acc_mean"] - two["student"]["acc_mean"]) <= 0.002
    c1, c2 = ((runs[n] / "reports/plots/evaluate/student-seed0.csv").read_text().splitlines() for n in (1, 2))
    assert len(c1) == len(c2) == 1 + 5  # header + one row per epoch, written once
    for a, b in zip(c1[1:], c2[1:]):
        loss1, loss2 = float(a.split(",")[1]), float(b.split(",")[1])
        assert loss2 == pytest.approx(loss1, rel=1e-4)
