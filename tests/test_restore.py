"""A stage that fails under ``dvc exp run -S``: the command its message names puts everything back."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from tests.helpers import sh


@pytest.mark.slow
@pytest.mark.pipeline
def test_the_command_a_failed_stage_names_restores_outputs_metrics_and_params(dvc_repo):
    repo, env = dvc_repo
    sh(["dvc", "repro"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "lock"], repo, env)
    committed = (repo / "params.yaml").read_bytes()

    # relabel: a cached output (condensed/shards) and a git-tracked metric; post_evaluate: git-tracked
    # metrics and plots only. Each bad value fails its stage in params validation, after DVC deleted
    # the stage's outputs.
    for setting, stage, deleted in [("relabel.teachers=[nosuch]", "relabel", "reports/relabel.json"),
                                    ("evaluate.seeds=0", "post_evaluate", "reports/metrics.json")]:
        r = subprocess.run(["dvc", "exp", "run", "-S", setting], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=900)
        log = r.stdout + r.stderr
        assert r.returncode != 0 and not (repo / deleted).exists(), log
        assert (repo / "params.yaml").read_bytes() != committed  # the -S value stayed behind
        hint = [line for line in log.splitlines() if "edc restore" in line][-1]
        assert "params.yaml and dvc.lock as committed" in hint, hint
        command = re.search(r"`(edc restore [^`]*)`", hint).group(1)
        assert command == f"edc restore {stage}"

        out = sh(shlex.split(command), repo, env)
        assert f"{deleted}: put back from git HEAD" in out and "dvc status: up to date" in out, out
        assert "Data and pipelines are up to date." in sh(["dvc", "status"], repo, env)
        assert (repo / "params.yaml").read_bytes() == committed
        assert sh(["git", "status", "--porcelain"], repo, env) == ""
