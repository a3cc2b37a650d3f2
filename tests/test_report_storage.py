"""`edc report`'s accuracy against storage: the label codecs' points from float16 logits down to hard
labels, and random real images with hard labels at equal bytes, on fabricated experiment records."""

from __future__ import annotations

import copy

from edc.params import read_yaml
from edc.report import Experiment, build_report, storage_points
from tests.conftest import ROOT

BASE = read_yaml(ROOT / "params.yaml")


def record(name: str, acc: float, labels: int, images: int = 7_850, plan: int = 60_000, container: int = 9_000,
           n: int = 10, epochs: int = 1000, **relabel) -> Experiment:
    """An experiment as read_experiments makes it: params with ``relabel`` overrides, one student, and
    reports/relabel.json's storage."""
    params = copy.deepcopy(BASE)
    params["relabel"].update(relabel)
    if name.startswith("random-hard"):
        params["evaluate"]["labels"] = "hard"
    metrics = {"convnet": {"acc_mean": acc, "acc_std": 0.01, "seeds": {"0": acc, "1": acc}}}
    total = images + labels + plan + container
    storage = {"images": images, "labels": labels, "plan": plan, "container": container, "total": total,
               "per_image_epoch": {"labels": round(labels / n / epochs, 3)}}
    e = Experiment(name, "abcdef0123", "2026-12-05T10:00:00", params, metrics, storage=storage,
                   relabel={"bytes": storage, "images": n, "epochs": epochs})
    e.mlflow_run, e.mlflow_ok = "run1", True
    return e


def test_storage_points_run_from_float16_logits_to_hard_labels_beside_real_images_at_equal_bytes(tmp_path):
    exps = {e.name: e for e in [
        record("edc-ipc1", 0.90, 200_000),
        record("codec-int8-ipc1", 0.89, 140_000, codec="int8"),
        record("topk-3-ipc1", 0.86, 90_000, topk=3),
        record("label_epochs-10-ipc1", 0.80, 2_000, label_epochs=10, plan=600),
        record("codec-hard-ipc1", 0.50, 0, codec="hard"),
        record("random-hard-ipc10", 0.93, 500_000, images=78_500, plan=150_000, n=100, epochs=250),
        record("random-hard-ipc1", 0.45, 200_000),
    ]}
    points = storage_points(1, exps)
    assert [(t, e.name) for t, e, _ in points] == [
        ("float16, 10 stored epochs", "label_epochs-10-ipc1"), ("hard labels", "codec-hard-ipc1"),
        ("float16 top-3", "topk-3-ipc1"), ("int8", "codec-int8-ipc1"), ("float16", "edc-ipc1")]
    assert [b for *_, b in points] == [19_450, 76_850, 166_850, 216_850, 276_850]
    lines = build_report(exps, tmp_path / "plots", tmp_path).splitlines()
    rows = [ln for ln in lines if ln.startswith(("| float16", "| int8", "| hard labels", "| random real"))]
    # equal bytes: total / 785 bytes per real image (784 pixels and a class), 10 classes
    assert rows == [
        "| float16, 10 stored epochs | 0.019 | 0.20 | 24 (ipc 2.5) | 80.00 ± 1.00 | label_epochs-10-ipc1 |",
        "| hard labels | 0.077 | 0.00 | 97 (ipc 9.8) | 50.00 ± 1.00 | codec-hard-ipc1 |",
        "| float16 top-3 | 0.167 | 9.00 | 212 (ipc 21.3) | 86.00 ± 1.00 | topk-3-ipc1 |",
        "| int8 | 0.217 | 14.00 | 276 (ipc 27.6) | 89.00 ± 1.00 | codec-int8-ipc1 |",
        "| float16 | 0.277 | 20.00 | 352 (ipc 35.3) | 90.00 ± 1.00 | edc-ipc1 |",
        "| random real images, hard labels, ipc 1 | 0.008 | 0.00 | 10 | 45.00 ± 1.00 | random-hard-ipc1 |",
        "| random real images, hard labels, ipc 10 | 0.079 | 0.00 | 100 | 93.00 ± 1.00 | random-hard-ipc10 |"]
    assert (tmp_path / "plots/storage-ipc1.png").stat().st_size > 1000
    assert "random-hard-ipc10" in " ".join(lines)  # the baseline from another ipc is named


def test_a_hard_label_run_on_a_soft_label_set_counts_the_set_without_its_labels(tmp_path):
    """The labels sweep's hard point stores soft labels it never reads: its bytes are the rest."""
    exps = {e.name: e for e in [record("edc-ipc1", 0.90, 200_000), record("labels-hard-ipc1", 0.5, 200_000)]}
    exps["labels-hard-ipc1"].params["evaluate"]["labels"] = "hard"
    assert [(t, b) for t, _, b in storage_points(1, exps)] == [("hard labels", 76_850), ("float16", 276_850)]
