"""The machinery behind a result the field can trust: trials redraw a set's own randomness and keep
the shared work, paired methods start from the same images, the full-data reference of HLR."""

from __future__ import annotations

import torch

from edc.evaluate import FullTrainSet
from edc.imageset import read_imageset
from edc.io import read_json
from edc.params import parse_params
from edc.presets import preset_overrides
from edc.runtime import derive_seed, trial_seed
from tests.conftest import md5_tree, run_stages, tiny_params, write_yaml


def _with(raw: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
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
    from tests.test_shards import FACTS

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
