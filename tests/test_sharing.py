"""Crash safety under `dvc repro`, and sharing a condensed set through a DVC remote."""

from __future__ import annotations

import hashlib

import pytest

from edc.io import md5_file
from edc.shards import load_condensed
from tests.helpers import lock_outs, ran, sh, sh_fails

pytestmark = pytest.mark.pipeline


@pytest.mark.slow
def test_killed_repro_resumes_and_the_set_round_trips_through_a_remote(dvc_repo, tmp_path):
    repo, env = dvc_repo

    # A SIGKILL in the middle of synthesize: DVC records nothing for it, and the next repro finishes
    # the job from the checkpoint.
    out = sh_fails(["dvc", "repro"], repo, {**env, "EDC_CHECKPOINT_SECONDS": "0", "EDC_CRASH_AFTER_CHECKPOINTS": "2"})
    assert "Running stage 'synthesize'" in out and "Running stage 'relabel'" not in out
    assert not (repo / "condensed/images").exists() and (repo / "condensed/.images.resume/state.pt").exists()
    assert "synthesize" in sh(["dvc", "status"], repo, env)
    out = sh(["dvc", "repro"], repo, env)
    # the reference stage (off by default) reads only the prepared data; DVC orders it after synthesize
    assert ran(out) == {"synthesize", "relabel", "post_evaluate", "continual", "slimming", "reference"}
    assert "synthesize: resuming" in out
    resumed = lock_outs(repo)

    # Push to a local remote, clone, pull: everything is there and up to date.
    remote = tmp_path / "remote"
    sh(["dvc", "remote", "add", "-d", "store", str(remote)], repo, env)
    sh(["dvc", "push"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "pipeline and remote"], repo, env)
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    sh(["dvc", "pull"], clone, env)
    assert "up to date" in sh(["dvc", "status"], clone, env)
    assert md5_file(clone / "reports/metrics.json") == md5_file(repo / "reports/metrics.json")

    # From scratch in the clone, without any cache: the same bytes as the resumed run, so the
    # interrupted run cost nothing in reproducibility; post_evaluate gives the same metrics.
    sh(["dvc", "repro", "--force", "--no-run-cache"], clone, env)
    assert lock_outs(clone) == resumed
    assert md5_file(clone / "reports/metrics.json") == md5_file(repo / "reports/metrics.json")

    # `dvc get` from the repository: a condensed set that edc.shards reads without the pipeline.
    got = tmp_path / "got"
    sh(["dvc", "get", str(repo), "condensed/shards", "-o", str(got)], tmp_path, env)
    ds = load_condensed(got)
    assert len(ds.images) == 20 and ds.epochs == 2 and ds.facts.name == "mnist5k"
    assert sum(len(x) for x, _, _ in ds) == 2 * 20  # every stored epoch replays

    # `dvc import` into another DVC repository: the set arrives with its source recorded, and
    # `dvc update` would follow the producer's later versions.
    consumer = tmp_path / "consumer"
    consumer.mkdir()
    sh(["git", "init", "-q", "-b", "main"], consumer, env)
    sh(["dvc", "init", "-q"], consumer, env)
    sh(["dvc", "import", str(repo), "condensed/shards", "-o", "edc-set"], consumer, env)
    imported = load_condensed(consumer / "edc-set")
    assert md5_file(consumer / "edc-set/meta.json") == md5_file(repo / "condensed/shards/meta.json")
    assert sum(len(x) for x, _, _ in imported) == 2 * 20
    assert "condensed/shards" in (consumer / "edc-set.dvc").read_text()

    # A corrupted object in the remote is caught on pull when the remote verifies hashes.
    victim = max((p for p in remote.rglob("*") if p.is_file() and not p.name.endswith(".dir")),
                 key=lambda p: p.stat().st_size)
    victim.chmod(0o644)
    victim.write_bytes(b"corrupted" + victim.read_bytes()[9:])
    assert hashlib.md5(victim.read_bytes()).hexdigest() != victim.parent.name + victim.name
    second = tmp_path / "second"
    sh(["git", "clone", "-q", str(repo), str(second)], tmp_path, env)
    sh(["dvc", "remote", "modify", "--local", "store", "verify", "true"], second, env)
    out = sh_fails(["dvc", "pull"], second, env)
    assert "corrupted" in out.lower() or "hash" in out.lower() or "failed" in out.lower(), out
