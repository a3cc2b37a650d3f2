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
from edc.params import read_yaml
from tests.helpers import md5_tree, run, run_stage, write_yaml

OUTPUTS = {"synthesize": ["condensed/images", "reports/synth.json", "reports/plots/synth_loss.csv",
                          "reports/synth_grid.png"],
           "relabel": ["condensed/shards"]}


@pytest.fixture(scope="module")
def finished(long_workspace) -> Path:
    """The session's long workspace: 4 synthesis batches and relabel batches of 7, 7, 6 to deal out."""
    return long_workspace


def launch(work: Path, stage: str, nproc: int, **env) -> subprocess.CompletedProcess:
    r = run_stage(work, stage, nproc, **{"OMP_NUM_THREADS": "1", **env})
    if not env:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def outputs(work: Path, stage: str) -> dict[str, str]:
    tree = md5_tree(work)
    return {k: v for k, v in tree.items() if any(k.startswith(o) for o in OUTPUTS[stage])}


@pytest.fixture(scope="module")
def one_process(finished, tmp_path_factory) -> dict[str, dict[str, str]]:
    """synthesize's and relabel's outputs from one process."""
    results = {}
    for stage in OUTPUTS:
        work = tmp_path_factory.mktemp(f"one-{stage}")
        shutil.copytree(finished, work, dirs_exist_ok=True)
        for o in OUTPUTS[stage]:
            (shutil.rmtree if (work / o).is_dir() else os.remove)(work / o)
        launch(work, stage, 1)
        results[stage] = outputs(work, stage)
    return results


def without_outputs(finished: Path, work: Path, stage: str) -> Path:
    shutil.copytree(finished, work)
    for o in OUTPUTS[stage]:
        (shutil.rmtree if (work / o).is_dir() else os.remove)(work / o)
    return work


@pytest.mark.pipeline
@pytest.mark.parametrize("stage", ["synthesize", "relabel"])
def test_two_ranks_write_what_one_process_writes(finished, one_process, tmp_path, stage):
    work = without_outputs(finished, tmp_path / "n2", stage)
    launch(work, stage, 2)
    assert outputs(work, stage) == one_process[stage] and len(one_process[stage]) >= 4
    assert not [x.name for x in (work / OUTPUTS[stage][0]).parent.iterdir() if x.name.startswith(".")]


@pytest.mark.pipeline
@pytest.mark.parametrize("stage", ["synthesize", "relabel"])
def test_killed_ranks_resume_with_any_number_of_ranks(finished, one_process, tmp_path, stage):
    """Both ranks are SIGKILLed after their first finished batch (synthesize) or label shard (relabel); a
    rerun with 2 ranks, or for relabel with 1 process, computes only the rest and writes the same bytes."""
    for nproc_after in (2, 1) if stage == "relabel" else (2,):
        work = without_outputs(finished, tmp_path / f"then{nproc_after}", stage)
        r = launch(work, stage, 2, EDC_CRASH_AFTER_CHECKPOINTS="1")
        assert r.returncode != 0
        resume = work / OUTPUTS[stage][0]
        resume = resume.with_name(f".{resume.name}.resume")
        # A unit is finished when all its files are there: a rank that torchrun stopped when the other
        # was killed may have left a label shard without its agreement file (recomputed on resume).
        kept = [f.name for f in resume.iterdir() if f.name.startswith("batch-")
                or (f.name.startswith("labels-") and (resume / f".agree-{f.name[7:13]}.json").is_file())]
        assert kept and not (work / OUTPUTS[stage][0]).exists()
        r = launch(work, stage, nproc_after)
        assert f"{stage}: resuming with {len(kept)}/" in r.stdout, r.stdout
        assert outputs(work, stage) == one_process[stage]
        assert not resume.exists()


def fresh_copy(finished: Path, work: Path, outputs: list[str], **params) -> Path:
    shutil.copytree(finished, work)
    for o in outputs:
        (shutil.rmtree if (work / o).is_dir() else os.remove)(work / o)
    p = read_yaml(work / "params.yaml")
    for section, values in params.items():
        p[section].update(values)
    write_yaml(work / "params.yaml", p)
    return work


@pytest.mark.pipeline
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


@pytest.mark.pipeline
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
    assert len(c1) == len(c2) == 1 + 5  # header + one row per relabel epoch (5), written once
    for a, b in zip(c1[1:], c2[1:]):
        loss1, loss2 = float(a.split(",")[1]), float(b.split(",")[1])
        assert loss2 == pytest.approx(loss1, rel=1e-4)


def test_only_rank_0_prints_unless_forced():
    code = ("from edc.distributed import print_on_rank0\n"
            "print_on_rank0(0); print('rank 0 speaks')\n"
            "print_on_rank0(1); print('hidden'); print('forced', force=True)\n")
    r = run([sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out == "rank 0 speaks\nforced\n"
