"""Long stages killed with SIGKILL resume from their checkpoint and write the same bytes."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from edc.io import md5_file
from edc.params import read_yaml
from edc.resume import fingerprint, resume_dir
from tests.helpers import md5_tree, run_stage, write_yaml

# stage -> (inputs it reads from the workspace, outputs it writes); argv from dvc.yaml
STAGES = {
    "synthesize": (["data/prepared", "condensed/init", "models/observers", "stats"],
                   ["condensed/images", "reports/synth.json", "reports/plots/synth_loss.csv",
                    "reports/synth_grid.png"]),
    "relabel": (["data/prepared", "condensed/images", "models/observers"], ["condensed/shards"]),
    "post_evaluate": (["data/prepared", "condensed/shards"], ["reports/metrics.json", "reports/plots/evaluate"]),
}


@pytest.fixture(scope="module")
def upstream(long_workspace) -> Path:
    """The session's workspace with every stage's output, from params long enough to be interrupted."""
    return long_workspace


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


@pytest.mark.pipeline
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
    # relabel keeps its finished label shards; the others one state file
    kept = "labels-000000.tar" if name == "relabel" else "state.pt"
    assert (resume_dir(work / STAGES[name][1][0]) / kept).is_file()

    r = run_stage(work, name, EDC_CHECKPOINT_SECONDS="0")
    assert r.returncode == 0, r.stderr
    assert f"{name}: resuming" in r.stdout, r.stdout
    assert outputs(work, name) == want
    assert not resume_dir(work / STAGES[name][1][0]).exists()
    # Nothing else is left behind next to the outputs (temporary siblings, half-written shards).
    for item in STAGES[name][1]:
        assert sorted(x.name for x in (work / item).parent.iterdir() if x.name.startswith(".")) == []


@pytest.mark.pipeline
def test_a_checkpoint_of_other_params_is_discarded(upstream, tmp_path):
    work = workspace(upstream, tmp_path / "w", "relabel")
    r = run_stage(work, "relabel", EDC_CHECKPOINT_SECONDS="0", EDC_CRASH_AFTER_CHECKPOINTS="2")
    assert r.returncode == -signal.SIGKILL
    p = read_yaml(upstream / "params.yaml")
    p["relabel"]["aug"]["scale_min"] = 0.3  # another plan: the saved epochs no longer belong to it
    write_yaml(work / "params.yaml", p)
    r = run_stage(work, "relabel")
    assert r.returncode == 0, r.stderr
    assert "checkpoint of other inputs or params; discarded" in r.stdout and "resuming" not in r.stdout
    clean = workspace(upstream, tmp_path / "clean", "relabel")
    write_yaml(clean / "params.yaml", p)
    assert run_stage(clean, "relabel").returncode == 0
    assert outputs(work, "relabel") == outputs(clean, "relabel")


def test_the_fingerprint_follows_every_input_byte_and_name(tmp_path):
    """A checkpoint is kept only for the very inputs it was made from: one byte changed at the same
    size, a file renamed, a file added to an input directory, or bytes moved from one file to the
    next (even where the file name could be read into the bytes) each give another fingerprint; the
    same inputs give the same one."""
    d = tmp_path / "set"
    d.mkdir()
    (d / "a.bin").write_bytes(b"\x00" * 3000)
    (d / "b.bin").write_bytes(b"xy")
    single = tmp_path / "w.bin"
    single.write_bytes(b"weights")

    def fp():
        return fingerprint("s", {"k": 1}, [d, single])

    seen = {fp()}
    assert fp() in seen
    (d / "a.bin").write_bytes(b"\x00" * 2999 + b"\x01")
    seen.add(fp())
    (d / "a.bin").write_bytes(b"")
    (d / "b.bin").write_bytes(b"b.bin:\nX")
    seen.add(fp())
    (d / "a.bin").write_bytes(b"b.bin:\n")  # the same bytes in all, the boundary moved
    (d / "b.bin").write_bytes(b"X")
    seen.add(fp())
    (d / "b.bin").rename(d / "c.bin")
    seen.add(fp())
    (d / "sub").mkdir()
    (d / "sub" / "e.bin").write_bytes(b"")
    seen.add(fp())
    single.write_bytes(b"weightz")
    seen.add(fp())
    assert len(seen) == 7
