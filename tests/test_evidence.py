"""The machinery behind a result the field can trust: trials redraw a set's own randomness and keep
the shared work, paired methods start from the same images, the full-data reference of HLR."""

from __future__ import annotations

import pytest
import torch

from edc.evaluate import FullTrainSet
from edc.imageset import read_imageset
from edc.io import read_json
from edc.params import parse_params, read_yaml, set_dotted
from edc.presets import preset_overrides
from edc.seeding import derive_seed, trial_seed
from tests.helpers import ROOT, md5_tree, run_stages, tiny_params, write_yaml


def _with(raw: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    return raw


def test_trial_zero_keeps_the_seeds_and_other_trials_redraw_them():
    assert trial_seed(7, 0) == 7  # the default run keeps its bytes
    assert len({trial_seed(7, t) for t in range(5)}) == 5 and trial_seed(7, 1) == derive_seed(7, "trial", "1")
    assert trial_seed(8, 1) != trial_seed(7, 1)


def test_within_a_trial_edc_and_random_soft_start_from_the_same_real_images(tmp_path):
    """The paired difference IOR needs: the same initial draw for edc and random-soft in a trial, a
    new one in the next trial; the split (prepare) is shared by all trials."""
    outs = {}
    for method, trial in (("edc", 0), ("random-soft", 0), ("edc", 1), ("random-soft", 1)):
        raw = tiny_params()
        raw = _with(raw, {**preset_overrides(method, parse_params(raw)), "trial": trial,
                          "synth.observers": ["tiny"]})
        work = tmp_path / f"{method}-{trial}"
        run_stages(work, write_yaml(tmp_path / f"{method}-{trial}.yaml", raw), ("prepare", "init"))
        outs[method, trial] = work
    for trial in (0, 1):
        edc, soft = (md5_tree(outs[m, trial] / "condensed/init") for m in ("edc", "random-soft"))
        assert edc == soft
    assert md5_tree(outs["edc", 0] / "data/prepared") == md5_tree(outs["edc", 1] / "data/prepared")
    (_, _, m0), (_, _, m1) = (read_imageset(outs["edc", t] / "condensed/init") for t in (0, 1))
    assert m0["method"] == "real" and "trial" not in m0 and m1["trial"] == 1
    assert [r["sources"] for r in m0["index"]] != [r["sources"] for r in m1["index"]]


def test_the_full_train_split_is_seen_once_per_epoch_in_a_seeded_order():
    from edc.data import TensorSplit
    from tests.helpers import FACTS

    images, labels = torch.randn(10, 3, 10, 10), torch.arange(10) % 4
    aug = parse_params(tiny_params()).relabel.aug
    full = FullTrainSet(TensorSplit(images, labels), FACTS, 4, 3, aug, seed=1)
    assert full.labels == "hard" and full.batches_per_epoch == 3
    orders = []
    for e in range(3):
        seen = [(x, t, y) for x, t, y in full.epoch(e)]
        assert [len(y) for _, _, y in seen] == [4, 4, 2]
        assert all(torch.equal(t, y) for _, t, y in seen)
        order = torch.cat([y for _, _, y in seen])
        assert sorted(order.tolist()) == sorted(labels.tolist())
        orders.append(torch.cat([x for x, _, _ in seen]))
    assert not torch.equal(orders[0], orders[1])  # a fresh order and fresh crops each epoch
    again = FullTrainSet(TensorSplit(images, labels), FACTS, 4, 3, aug, seed=1)
    assert torch.equal(torch.cat([x for x, _, _ in again.epoch(1)]), orders[1])


def test_the_reference_stage_trains_each_student_on_the_whole_train_split(tmp_path):
    raw = tiny_params()
    raw["dataset"]["val_size"] = 100
    raw["reference"] = {"enabled": False, "epochs": 1}
    run_stages(tmp_path, write_yaml(tmp_path / "off.yaml", raw), ("prepare", "reference"))
    assert read_json(tmp_path / "reports/reference.json") == {"enabled": False}
    raw["reference"]["enabled"] = True
    run_stages(tmp_path, write_yaml(tmp_path / "on.yaml", raw), ("reference",))
    ref = read_json(tmp_path / "reports/reference.json")
    assert ref["enabled"] and ref["epochs"] == 1 and ref["images"] == 4000 - 100
    student = ref["students"]["student"]
    assert 0.5 < student["acc_mean"] <= 1 and 0 < student["val_acc_mean"] <= 1 and list(student["seeds"]) == ["0"]


# --- the report's metrics against hand-computed cases (docs/metrics.md) ------------------------------

def _exp(name: str, trial: int, acc: float, hard: float | None = None, noaug: float | None = None,
         ref: float | None = None, **params):
    from edc.params import read_yaml
    from edc.presets import parse_name
    from edc.report import Experiment

    p = read_yaml(ROOT / "params.yaml")
    p.update(trial=trial, **params)
    variants = {k: {"acc_mean": v} for k, v in (("hard", hard), ("noaug", noaug)) if v is not None}
    m = {"acc_mean": acc, "acc_std": 0.0, "seeds": {"0": acc, "1": acc}, **({"variants": variants} if variants else {})}
    assert parse_name(name) is not None
    return Experiment(name, f"{trial}bcdef0", f"2026-12-05T0{trial}:00:00", p, {"convnet": m},
                      reference={"convnet": {"acc_mean": ref, "acc_std": 0.001}} if ref is not None else None)


def _evidence_exps():
    edc = [_exp(f"edc-ipc1-t{t}", t, a, hard=h, noaug=n, ref=0.98)
           for t, a, h, n in ((0, 0.80, 0.60, 0.70), (1, 0.84, 0.62, 0.72), (2, 0.82, 0.64, 0.74))]
    soft = [_exp(f"random-soft-ipc1-t{t}", t, a) for t, a in ((0, 0.79), (1, 0.80), (2, 0.81))]
    return {e.name: e for e in edc + soft}


def test_accuracy_interval_ior_hlr_and_the_augmentation_pair_by_hand():
    from edc.report import build_report, evidence, method_trials, t_interval

    # t(0.975, 2) = 4.302653 (the table); values 0.80, 0.84, 0.82: mean 0.82, s = 0.02
    mean, half = t_interval([0.80, 0.84, 0.82])
    assert mean == pytest.approx(0.82) and half == pytest.approx(4.302653 * 0.02 / 3 ** 0.5, rel=1e-6)
    assert t_interval([0.5]) == (0.5, None)
    groups = method_trials(_evidence_exps())
    ev = evidence(groups["edc", 1], groups["random-soft", 1], "convnet")
    assert ev.trials == [0, 1, 2] and ev.seeds == 2
    # IOR: paired differences 0.01, 0.04, 0.01: mean 0.02, s = sqrt(0.0003)
    assert ev.ior[0] == pytest.approx(0.02) and ev.ior[1] == pytest.approx(4.302653 * 0.0003 ** 0.5 / 3 ** 0.5)
    # HLR: 0.98 - (0.60, 0.62, 0.64) = 0.38, 0.36, 0.34
    assert ev.hlr[0] == pytest.approx(0.36) and ev.hlr[1] == pytest.approx(4.302653 * 0.02 / 3 ** 0.5)
    assert ev.aug == pytest.approx((0.82, 0.72))
    lines = build_report(_evidence_exps(), None).splitlines()
    assert "| edc | convnet | 3: 0,1,2 (2 seeds) | 82.00 ± 4.97 | +2.00 ± 4.30 | +36.00 ± 4.97 | 82.00 / 72.00 | - |" \
        in lines
    assert "| random-soft | convnet | 3: 0,1,2 (2 seeds) | 80.00 ± 2.48 | 0 (the baseline) | - | - | - |" in lines
    assert any(line.startswith("Full-data reference") and "convnet 98.00 ± 0.10" in line for line in lines)


def test_ior_pairs_only_trials_under_the_same_protocol_and_the_report_is_stable():
    from edc.report import build_report, evidence, method_trials

    exps = _evidence_exps()
    exps["random-soft-ipc1-t2"].params["zeta"] = 1.0  # another evaluation protocol: not a pair
    groups = method_trials(exps)
    ev = evidence(groups["edc", 1], groups["random-soft", 1], "convnet")
    # differences 0.01, 0.04: mean 0.025, s = 0.03 / sqrt(2); t(0.975, 1) = 12.706205
    assert ev.ior_trials == 2 and ev.ior[0] == pytest.approx(0.025)
    assert ev.ior[1] == pytest.approx(12.706205 * (0.03 / 2 ** 0.5) / 2 ** 0.5, rel=1e-6)
    assert "+2.50 ± 19.06 (2 paired)" in build_report(exps, None)
    # a set evaluated with hard labels is its own hard-label accuracy; trial 0 without a suffix is trial 0
    hard = _exp("random-hard-ipc1", 0, 0.50, ref=0.98, evaluate={**exps["edc-ipc1-t0"].params["evaluate"],
                                                                  "labels": "hard"})
    ev = evidence(method_trials({hard.name: hard})["random-hard", 1], None, "convnet")
    assert ev.hlr == (pytest.approx(0.48), None) and ev.ior is None
    assert build_report(exps, None) == build_report(dict(reversed(list(exps.items()))), None)


def test_the_default_students_include_one_the_observers_never_were_and_the_report_marks_it():
    from edc.report import build_report

    p = parse_params(read_yaml(ROOT / "params.yaml"))
    observed = {m.arch for m in p.observers.models}
    unseen = [s.name for s in p.evaluate.students if s.arch not in observed]
    assert unseen == ["vit"]
    exps = _evidence_exps()
    for e in exps.values():
        e.metrics["vit"] = {**e.metrics["convnet"], "acc_mean": e.metrics["convnet"]["acc_mean"] - 0.1}
    rows = [ln for ln in build_report(exps, None).splitlines() if "*(unseen)*" in ln]
    assert [r.split(" | ")[:2] for r in rows] == [["| edc", "vit *(unseen)*"], ["| random-soft", "vit *(unseen)*"]]
    assert "| +2.00 ± 4.30 |" in rows[0]  # the same paired differences, 0.1 lower on both sides


@pytest.mark.slow
def test_trials_of_edc_and_random_soft_give_the_fields_metrics_and_a_stable_report(dvc_repo):
    """What a user runs: the trial command for both methods, then `edc report`, twice."""
    import sys

    from tests.helpers import sh

    repo, env = dvc_repo
    edc = [sys.executable, "-m", "edc.cli"]
    # the shared protocol shrunk to seconds (the presets pin the full one), the same for both methods
    tiny = ["-S", "relabel.epochs=2", "-S", "relabel.min_steps=0", "-S", "relabel.batch_size=8",
            "-S", "evaluate.seeds=1", "-S", "evaluate.eval_every=1"]
    sh([*edc, "exp", "preset", "random-soft", "--ipc", "2", "--trials", "2", *tiny], repo, env)
    sh([*edc, "exp", "preset", "edc", "--ipc", "2", "--trials", "2", *tiny, "-S", "synth.iterations=4",
        "-S", "evaluate.variants=[hard,noaug]", "-S", "reference.enabled=true", "-S", "reference.epochs=1"], repo, env)
    sh([*edc, "report"], repo, env)
    first = (repo / "reports/results.md").read_text()
    sh([*edc, "report"], repo, env)
    assert (repo / "reports/results.md").read_text() == first
    rows = {ln.split(" | ")[0]: ln.split(" | ") for ln in first.splitlines() if ln.startswith("| ") and
            len(ln.split(" | ")) == 8 and " | student | 2: 0,1 (1 seed) | " in ln}
    assert {"| edc", "| random-soft"} <= set(rows), first
    edc_row, soft_row = rows["| edc"], rows["| random-soft"]
    assert " ± " in edc_row[3] and " ± " in soft_row[3]
    assert edc_row[4].startswith(("+", "-")) and " ± " in edc_row[4]  # IOR with its interval
    assert " ± " in edc_row[5] and " / " in edc_row[6]  # HLR and the augmentation pair
    assert soft_row[4] == "0 (the baseline)" and soft_row[5] == "-"
    assert "Full-data reference" in first
