"""Long stages killed with SIGKILL resume from their checkpoint and write the same bytes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edc.io import md5_file
from edc.resume import resume_dir
from tests.conftest import ROOT, tiny_params, write_yaml
from tests.test_bad_inputs import ARGS
from tests.test_pipeline import md5_tree, run_stages

# stage -> (inputs it reads from the workspace, outputs it writes); argv as in the bad-input catalogue
STAGES = {
    "synthesize": (["data/prepared", "condensed/init", "models/observers", "stats"],
                   ["condensed/images", "reports/synth.json", "reports/plots/synth_loss.csv",
                    "reports/synth_grid.png"]),
    "relabel": (["data/prepared", "condensed/images", "models/observers"], ["condensed/shards"]),
    "post_evaluate": (["data/prepared", "condensed/shards"], ["reports/metrics.json", "reports/plots/evaluate"]),
}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """A workspace with every stage's output, from params long enough to be interrupted."""
    work = tmp_path_factory.mktemp("resume")
    p = tiny_params()
    p["synth"]["iterations"] = 6
    p["relabel"]["epochs"] = 4
    p["evaluate"]["seeds"] = 2
    params = write_yaml(work / "params.yaml", p)
    run_stages(work, params)
    return work


def run_stage(work: Path, name: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{name}.py"), "--params", "params.yaml",
                           *ARGS[name]], cwd=work, env=full_env, capture_output=True, text=True, timeout=600)


def workspace(upstream: Path, dest: Path, name: str) -> Path:
    dest.mkdir()
    shutil.copy(upstream / "params.yaml", dest / "params.yaml")
    for item in STAGES[name][0]:
        shutil.copytree(upstream / item, dest / item)
    return dest


def outputs(work: Path, name: str) -> dict[str, str]:
    out = {}
    for item in STAGES[name][1]:
        p = work / item
        if p.is_dir():
            out.update({f"{item}/{k}": v for k, v in md5_tree(p).items()})
        else:
            out[item] = md5_file(p)
    return out


@pytest.mark.parametrize("name,crash_after", [("synthesize", 3), ("relabel", 2), ("post_evaluate", 3)])
def test_a_killed_stage_resumes_to_the_same_bytes(upstream, tmp_path, name, crash_after):
    clean = workspace(upstream, tmp_path / "clean", name)
    r = run_stage(clean, name)
    assert r.returncode == 0, r.stderr
    want = outputs(clean, name)

    work = workspace(upstream, tmp_path / "killed", name)
    r = run_stage(work, name, EDC_CHECKPOINT_SECONDS="0", EDC_CRASH_AFTER_CHECKPOINTS=str(crash_after))
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    # Killed: no output exists that DVC could take for a finished one; the checkpoint does.
    assert not any((work / item).exists() for item in STAGES[name][1])
    # relabel keeps its finished epochs' shards; the others one state file
    kept = "epoch-0000.tar" if name == "relabel" else "state.pt"
    assert (resume_dir(work / STAGES[name][1][0]) / kept).is_file()

    r = run_stage(work, name, EDC_CHECKPOINT_SECONDS="0")
    assert r.returncode == 0, r.stderr
    assert f"{name}: resuming" in r.stdout, r.stdout
    assert outputs(work, name) == want
    assert not resume_dir(work / STAGES[name][1][0]).exists()
    # Nothing else is left behind next to the outputs (temporary siblings, half-written shards).
    for item in STAGES[name][1]:
        assert sorted(x.name for x in (work / item).parent.iterdir() if x.name.startswith(".")) == []


def test_a_checkpoint_of_other_params_is_discarded(upstream, tmp_path):
    work = workspace(upstream, tmp_path / "w", "relabel")
    r = run_stage(work, "relabel", EDC_CHECKPOINT_SECONDS="0", EDC_CRASH_AFTER_CHECKPOINTS="2")
    assert r.returncode == -signal.SIGKILL
    p = tiny_params()
    p["synth"]["iterations"], p["relabel"]["epochs"], p["evaluate"]["seeds"] = 6, 4, 2
    p["relabel"]["aug"]["scale_min"] = 0.3  # another plan: the saved epochs no longer belong to it
    write_yaml(work / "params.yaml", p)
    r = run_stage(work, "relabel")
    assert r.returncode == 0, r.stderr
    assert "checkpoint of other inputs or params; discarded" in r.stdout and "resuming" not in r.stdout
    clean = workspace(upstream, tmp_path / "clean", "relabel")
    write_yaml(clean / "params.yaml", p)
    assert run_stage(clean, "relabel").returncode == 0
    assert outputs(work, "relabel") == outputs(clean, "relabel")
