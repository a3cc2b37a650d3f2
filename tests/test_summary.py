"""`edc metrics`: the students' accuracies from reports/metrics.json as one short table."""

from __future__ import annotations

import json
import sys

import pytest

from edc.errors import ArtifactError
from edc.summary import accuracy_table, read_metrics
from tests.helpers import run


def test_each_student_is_one_row_in_percent():
    metrics = {"convnet": {"acc_mean": 0.976, "acc_std": 0.001, "raw_acc_mean": 0.974333, "val_acc_mean": 0.958667,
                           "val_acc_std": 0.004163, "seeds": {"0": 0.977, "1": 0.976, "2": 0.975}},
               "resnet18": {"acc_mean": 0.5, "acc_std": 0.0, "seeds": {"0": 0.5}}}  # no validation split, no EMA
    lines = accuracy_table(metrics).splitlines()
    assert lines[2] == "| convnet | 97.60 ± 0.10 | 95.87 ± 0.42 | 97.43 | 3 |"
    assert lines[3] == "| resnet18 | 50.00 ± 0.00 | - | - | 1 |"
    assert len(lines) == 4 and all(len(line) < 80 for line in lines)


def test_a_missing_or_foreign_file_is_one_line(tmp_path):
    with pytest.raises(ArtifactError, match="missing; run `dvc repro`"):
        read_metrics(tmp_path / "metrics.json")
    (tmp_path / "observers.json").write_text(json.dumps({"tiny": {"test_acc": 0.9}}))
    with pytest.raises(ArtifactError, match="observers.json: not post_evaluate's metrics"):
        read_metrics(tmp_path / "observers.json")
    r = run([sys.executable, "-m", "edc.cli", "metrics", str(tmp_path / "metrics.json")], timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"{tmp_path / 'metrics.json'}: missing; run `dvc repro` " \
                                                     "(or `make repro`) first"
