"""`edc report`'s accuracy against storage: the label storages from float16 logits down to hard labels,
each over its trials, the validation rule that chose the default, and random real images with hard
labels at equal bytes, on fabricated experiment records."""

from __future__ import annotations

import copy

from edc.params import read_yaml
from edc.report import Experiment, build_report, storage_points
from tests.conftest import ROOT

BASE = read_yaml(ROOT / "params.yaml")


def record(name: str, acc: float, labels: int, images: int = 7_850, plan: int = 60_000, container: int = 9_000,
           n: int = 10, epochs: int = 1000, stored: int | None = None, trial: int = 0, val: float | None = None,
           **relabel) -> Experiment:
    """An experiment as read_experiments makes it: params with ``relabel`` overrides (float16 logits
    unless ``codec`` says otherwise) and ``trial``, one
    student, and reports/relabel.json (storage, epochs, stored epochs)."""
    params = copy.deepcopy(BASE)
    params["relabel"].update({"codec": "float16", **relabel})  # float16 unless said (params.yaml stores int8)
    params["trial"] = trial
    if name.startswith("random-hard"):
        params["evaluate"]["labels"] = "hard"
    metrics = {"convnet": {"acc_mean": acc, "acc_std": 0.01, "seeds": {"0": acc},
                           **({} if val is None else {"val_acc_mean": val, "val_acc_std": 0.0})}}
    total = images + labels + plan + container
    storage = {"images": images, "labels": labels, "plan": plan, "container": container, "total": total,
               "per_image_epoch": {"labels": round(labels / n / epochs, 3)}}
    e = Experiment(name, "abcdef0123", "2026-12-05T10:00:00", params, metrics, storage=storage,
                   relabel={"bytes": storage, "images": n, "epochs": epochs, "stored_epochs": stored or epochs})
    e.mlflow_run, e.mlflow_ok = "run1", True
    return e


def rows(exps: dict[str, Experiment], tmp_path) -> list[str]:
    lines = build_report(exps, tmp_path / "plots", tmp_path).splitlines()
    return [ln for ln in lines if ln.startswith(("| float16", "| int8", "| hard labels", "| random real"))]


def test_storage_points_run_from_float16_logits_to_hard_labels_beside_real_images_at_equal_bytes(tmp_path):
    exps = {e.name: e for e in [
        record("edc-ipc1", 0.90, 200_000),
        record("codec-int8-ipc1", 0.89, 140_000, codec="int8"),
        record("topk-3-ipc1", 0.86, 90_000, topk=3),
        record("label_views-10-ipc1", 0.80, 2_000, label_views=10, stored=10, plan=600),
        record("codec-hard-ipc1", 0.50, 0, codec="hard"),
        record("random-hard-ipc10", 0.93, 500_000, images=78_500, plan=150_000, n=100, epochs=250),
        record("random-hard-ipc1", 0.45, 200_000),
    ]}
    points = storage_points(1, exps)
    assert [(p.title, p.names) for p in points] == [
        ("float16, 10 of 1000 epochs stored", "label_views-10-ipc1"), ("hard labels", "codec-hard-ipc1"),
        ("float16 top-3", "topk-3-ipc1"), ("int8", "codec-int8-ipc1"), ("float16", "edc-ipc1")]
    assert [p.bytes for p in points] == [19_450, 76_850, 166_850, 216_850, 276_850]
    # equal bytes: total / 785 bytes per real image (784 pixels and a class), 10 classes; one trial each
    assert rows(exps, tmp_path) == [
        "| float16, 10 of 1000 epochs stored | 1 | 0.019 | 0.20 | 24 (ipc 2.5) | 80.00 (1 trial, ± 1.00 over seeds) "
        "| - | label_views-10-ipc1 |",
        "| hard labels | 1 | 0.077 | 0.00 | 97 (ipc 9.8) | 50.00 (1 trial, ± 1.00 over seeds) | - | codec-hard-ipc1 |",
        "| float16 top-3 | 1 | 0.167 | 9.00 | 212 (ipc 21.3) | 86.00 (1 trial, ± 1.00 over seeds) | - | topk-3-ipc1 |",
        "| int8 | 1 | 0.217 | 14.00 | 276 (ipc 27.6) | 89.00 (1 trial, ± 1.00 over seeds) | - | codec-int8-ipc1 |",
        "| float16 | 1 | 0.277 | 20.00 | 352 (ipc 35.3) | 90.00 (1 trial, ± 1.00 over seeds) | - | edc-ipc1 |",
        "| random real images, hard labels, ipc 1 | 1 | 0.008 | 0.00 | 10 | 45.00 (1 trial, ± 1.00 over seeds) | - "
        "| random-hard-ipc1 |",
        "| random real images, hard labels, ipc 10 | 1 | 0.079 | 0.00 | 100 | 93.00 (1 trial, ± 1.00 over seeds) | - "
        "| random-hard-ipc10 |"]
    assert (tmp_path / "plots/storage-ipc1.png").stat().st_size > 1000


def test_trials_of_one_storage_are_one_point_with_their_interval_and_the_validation_rule(tmp_path):
    """The edc preset's trials and the sweep point that stores the same labels are one point; its test
    accuracy is the mean ± the 95 % t-interval over the trials, and the rule compares each point's mean
    validation accuracy with float16's less float16's standard deviation over its trials."""
    exps = {e.name: e for e in [
        # float16, every epoch: test 0.90 / 0.92 / 0.94, validation 0.90 / 0.91 / 0.92 (mean 0.91, sd 0.01)
        record("edc-ipc1-t0", 0.90, 200_000, trial=0, val=0.90),
        record("edc-ipc1-t1", 0.92, 200_000, trial=1, val=0.91),
        record("label_views-0-ipc1-t2", 0.94, 200_000, trial=2, val=0.92, label_views=0),
        # int8: validation mean 0.905 >= 0.91 - 0.01 (rule: yes); top-3: 0.895 < 0.90 (rule: no)
        record("codec-int8-ipc1-t0", 0.89, 140_000, trial=0, val=0.90, codec="int8"),
        record("codec-int8-ipc1-t1", 0.91, 140_000, trial=1, val=0.91, codec="int8"),
        record("topk-3-ipc1-t0", 0.86, 90_000, trial=0, val=0.89, topk=3),
        record("topk-3-ipc1-t1", 0.88, 90_000, trial=1, val=0.90, topk=3),
        record("random-hard-ipc25-t0", 0.80, 1_960_000, images=196_250, n=250, trial=0),
        record("random-hard-ipc25-t1", 0.84, 1_960_000, images=196_250, n=250, trial=1),
    ]}
    points = storage_points(1, exps)
    full = points[-1]
    assert full.title == "float16" and [e.name for e in full.trials] == [
        "edc-ipc1-t0", "edc-ipc1-t1", "label_views-0-ipc1-t2"]
    # t(0.975, 2) * 0.02 / sqrt(3) = 4.3027 * 0.011547 = 0.0497; t(0.975, 1) * 0.01414 / sqrt(2) = 12.706 * 0.01
    assert rows(exps, tmp_path) == [
        "| float16 top-3 | 2 | 0.167 | 9.00 | 212 (ipc 21.3) | 87.00 ± 12.71 [val 89.50] | no | topk-3-ipc1-t0 ... "
        "(2 trials) |",
        "| int8 | 2 | 0.217 | 14.00 | 276 (ipc 27.6) | 90.00 ± 12.71 [val 90.50] | yes | codec-int8-ipc1-t0 ... "
        "(2 trials) |",
        "| float16 | 3 | 0.277 | 20.00 | 352 (ipc 35.3) | 92.00 ± 4.97 [val 91.00] | - | edc-ipc1-t0 ... (3 trials) |",
        "| random real images, hard labels, ipc 25 | 2 | 0.196 | 0.00 | 250 | 82.00 ± 25.41 | - | "
        "random-hard-ipc25-t0 ... (2 trials) |"]


def test_a_hard_label_run_on_a_soft_label_set_counts_the_set_without_its_labels(tmp_path):
    """The labels sweep's hard point stores soft labels it never reads: its bytes are the rest."""
    exps = {e.name: e for e in [record("edc-ipc1", 0.90, 200_000), record("labels-hard-ipc1", 0.5, 200_000)]}
    exps["labels-hard-ipc1"].params["evaluate"]["labels"] = "hard"
    assert [(p.title, p.bytes) for p in storage_points(1, exps)] == [
        ("hard labels (soft labels stored, not read)", 76_850), ("float16", 276_850)]


def test_a_set_made_before_label_views_is_the_presets_own_where_the_rule_stores_every_epoch(tmp_path):
    """Trials made before relabel.label_views existed stored every epoch: at ipc 1 the default rule
    (1,500 views) stores every epoch too, so the page does not call them off-preset; at ipc 10 it stores
    150 of 250, and the page says so."""
    old = [record("edc-ipc1-t0", 0.90, 140_000, codec="int8"),
           record("edc-ipc10-t0", 0.95, 350_000, images=78_500, plan=150_000, n=100, epochs=250, codec="int8")]
    for e in old:
        del e.params["relabel"]["label_views"]
    notes = [ln for ln in build_report({e.name: e for e in old}, None, tmp_path).splitlines()
             if "preset's params" in ln]
    assert notes == ["- edc-ipc10-t0: not the edc preset's params: relabel.label_views: '(absent)' (preset: 1500)"]
