"""Throughput: the thread count each stage process takes, queued experiments side by side, and
post_evaluate's seeds in parallel processes (``eval_jobs``), which change no result."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edc.errors import EdcError
from edc.runtime import resolve_threads
from tests.conftest import ROOT


@pytest.mark.parametrize("env, cores, want", [
    ({}, 2, 2),                                   # alone: every core
    ({"EDC_JOBS": "2"}, 2, 1),                    # two queue workers on 2 cores: one thread each
    ({"EDC_JOBS": "3"}, 8, 2),                    # rounded down
    ({"EDC_JOBS": "4"}, 2, 1),                    # never below one
    ({"EDC_JOBS": "2", "LOCAL_WORLD_SIZE": "2"}, 8, 2),  # torchrun ranks divide too
    ({"EDC_JOBS": "2", "OMP_NUM_THREADS": "3"}, 8, 3),   # torch's own variable, set by the user, wins
    ({"EDC_THREADS": "5", "OMP_NUM_THREADS": "3", "EDC_JOBS": "2"}, 8, 5),  # and EDC_THREADS over all
])
def test_threads_divide_the_cores_between_side_by_side_runs(env, cores, want):
    assert resolve_threads(env, cores) == want


@pytest.mark.parametrize("name", ["EDC_THREADS", "EDC_JOBS"])
@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_bad_thread_setting_is_one_line_naming_the_variable(name, value):
    with pytest.raises(EdcError, match=f"^environment variable {name}: must be a positive whole number"):
        resolve_threads({name: value}, 4)


def _stage_threads(env: dict) -> subprocess.CompletedProcess:
    """A process that runs a stage's main through edc.stage.stage_main, as every stage script does,
    and prints the thread count its torch has."""
    code = ("import torch; from edc.stage import stage_main; "
            "stage_main(lambda argv: print(torch.get_num_threads(), torch.get_num_interop_threads()))")
    base = {k: v for k, v in os.environ.items() if k not in ("EDC_THREADS", "EDC_JOBS", "OMP_NUM_THREADS")}
    return subprocess.run([sys.executable, "-c", code], env={**base, "PYTHONPATH": str(ROOT), **env},
                          capture_output=True, text=True, timeout=120)


def test_a_stage_process_takes_its_share_of_the_cores():
    cores = len(os.sched_getaffinity(0))
    for env, want in (({"EDC_JOBS": str(cores)}, 1), ({"EDC_THREADS": "3"}, 3), ({}, cores)):
        r = _stage_threads(env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [str(want), "1"], env
    bad = _stage_threads({"EDC_JOBS": "x"})
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "environment variable EDC_JOBS: must be a positive whole number (got 'x')"]


def test_edc_queue_start_gives_the_workers_their_share(monkeypatch, capsys):
    """`edc queue start -j N` runs `dvc queue start -j N` with EDC_JOBS=N in the environment the
    workers inherit (DVC spawns them from that process with its environment)."""
    from edc import cli

    seen = []
    monkeypatch.setattr(cli.subprocess, "run", lambda cmd, env: seen.append((cmd, env)) or
                        subprocess.CompletedProcess(cmd, 0))
    monkeypatch.delenv("EDC_JOBS", raising=False)
    cli.main(["queue", "start", "-j", "2"])
    (cmd, env), = seen
    assert cmd[1:] == ["queue", "start", "-j", "2"] and env["EDC_JOBS"] == "2"
    assert resolve_threads(env, 2) == 1
    with pytest.raises(SystemExit):
        cli.main(["queue", "start", "-j", "0"])
    assert "must be a positive whole number (got '0')" in capsys.readouterr().err
