"""synthesize and relabel under `torchrun --nproc_per_node 2` (gloo, CPU) give the bytes of one process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_params, write_yaml
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
