"""`edc exp dataset NAME --root R`: the paper's per-dataset settings as params values."""

from __future__ import annotations

import shutil

import pytest

from edc.cli import main as edc_main
from edc.errors import ParamsError
from edc.io import read_json
from edc.params import get_dotted, load_params, read_yaml
from edc.presets import DATASET_HELP, dataset_overrides
from tests.helpers import ROOT, make_cifar10, run_stages, write_yaml


@pytest.mark.parametrize("name", list(DATASET_HELP))
def test_dataset_preset_applies_through_dvcs_parser_and_validates(tmp_path, monkeypatch, name):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data dir/with 'quotes'").mkdir(parents=True)  # --root must exist
    edc_main(["exp", "dataset", name, "--root", "data dir/with 'quotes'", "--apply"])
    after, want = read_yaml("params.yaml"), dataset_overrides(name, str(tmp_path / "data dir/with 'quotes'"))
    for key, value in want.items():
        assert get_dotted(after, key) == value, key
    load_params("params.yaml")
    before = read_yaml(ROOT / "params.yaml")
    assert after["seed"] == before["seed"] and after["ipc"] == before["ipc"]  # untouched keys stay


def test_paper_tables_values():
    c10, c100, tiny, in1k = (dataset_overrides(n, "/r") for n in ("cifar10", "cifar100", "tinyimagenet",
                                                                   "imagenet1k"))
    assert (c10["synth.iterations"], c10["synth.batch_size"], c10["relabel.epochs"], c10["relabel.batch_size"],
            c10["evaluate.schedule"]) == (75, "all", 1000, 25, "multistep")
    assert (c100["synth.iterations"], c100["synth.batch_size"], c100["relabel.batch_size"]) == (2000, 100, 50)
    assert len(c10["observers.models"]) == 8 and c10["init.method"] == "real"
    assert (tiny["relabel.epochs"], tiny["relabel.batch_size"], tiny["dataset.image_size"]) == (300, 100, 64)
    assert in1k["init.method"] == "rded" and in1k["synth.batch_size"] == 80 and in1k["dataset.storage"] == "files"
    assert c10["dataset.storage"] == tiny["dataset.storage"] == "arrays"
    assert all(m["weights"] == "imagenet" for m in in1k["observers.models"])
    assert "efficientnet_b0" in in1k["synth.observers"] and "efficientnet_b0" not in in1k["relabel.teachers"]
    assert "alexnet" not in in1k["synth.observers"] and "alexnet" in in1k["relabel.teachers"]  # no BatchNorm
    for v in (c10, c100, tiny, in1k):
        assert (v["alpha"], v["synth.flatness.beta"], v["synth.flatness.tau"], v["evaluate.ema_rate"]) == \
            (0.5, 0.99, 4.0, 0.99)
        # the paper's synthesis, not the MNIST recipe of params.yaml: one crop per image, statistics of the
        # original images, Table 4's flatness weight, the released code's matching weights
        assert (v["synth.class_views"], v["stats.augment"], v["synth.flatness.weight"], v["synth.r_bn"],
                v["synth.layers"], v["synth.first_layer_weight"], v["synth.class_var"]) == \
            (1, False, 0.25, 0.01, "sum", 10.0, "pooled")
    # RandAugment in post-evaluation where the paper's table lists it (Tables 7-10, not Table 6)
    assert [v["relabel.aug.randaugment"] for v in (c10, c100, tiny, in1k)] == [2, 2, 2, 0]


def test_a_dataset_preset_runs_edc_paper_on_that_dataset():
    """The synthesis keys a dataset preset sets are edc-paper's (but its iterations and batches, which
    the dataset's table sets): the two say the same thing about the method."""
    from edc.presets import preset_overrides

    paper = preset_overrides("edc-paper", load_params(ROOT / "params.yaml"))
    for name in DATASET_HELP:
        v = dataset_overrides(name, "/r")
        shared = [k for k in v if k.startswith(("synth.", "stats.")) and k in paper
                  and k not in ("synth.iterations", "synth.batch_size", "synth.observers", "synth.aug.flip")]
        assert len(shared) >= 10 and {k: v[k] for k in shared} == {k: paper[k] for k in shared}, name


def test_every_preset_file_is_listed_and_a_new_file_is_a_new_preset(tmp_path, monkeypatch):
    """The presets are data: each file of edc/dataset_presets/ (but the shared two) is a preset, and a
    file added there (listed in common.yaml) is one more, with no code."""
    from edc import presets

    files = {f.stem for f in presets.PRESETS_DIR.glob("*.yaml")} - {"common", "observers"}
    assert files == set(DATASET_HELP)
    for f in presets.PRESETS_DIR.glob("*.yaml"):
        shutil.copy(f, tmp_path / f.name)
    common = read_yaml(tmp_path / "common.yaml")
    common["presets"].append("svhn")
    write_yaml(tmp_path / "common.yaml", common)
    write_yaml(tmp_path / "svhn.yaml", {"help": "SVHN", "observers": "tiny", "teachers_exclude": ["shufflenet_v2"],
                                        "set": {"dataset.name": "npz", "synth.iterations": 10}})
    monkeypatch.setattr(presets, "PRESETS_DIR", tmp_path)
    monkeypatch.setattr(presets, "DATASET_HELP", {n: presets._read_preset(n)["help"] for n in common["presets"]})
    v = presets.dataset_overrides("svhn", "/data/svhn")
    assert (v["dataset.name"], v["dataset.root"], v["synth.iterations"], v["alpha"]) == ("npz", "/data/svhn", 10, 0.5)
    assert v["synth.observers"] == ["resnet18", "mobilenet_v2", "shufflenet_v2"]
    assert v["relabel.teachers"] == ["resnet18", "mobilenet_v2"]
    with pytest.raises(ParamsError, match="unknown dataset preset 'mnist'"):
        presets.dataset_overrides("mnist", "/r")


@pytest.mark.pipeline
def test_cifar10_preset_runs_the_pipeline_end_to_end(tmp_path, monkeypatch):
    """The CIFAR-10 command on a root of standard CIFAR-10 python batches, epochs cut down by -S."""
    root = make_cifar10(tmp_path / "cifar", per_class=3)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    edc_main(["exp", "dataset", "cifar10", "--root", str(root), "--apply", "-S", "ipc=1", "-S", "observers.epochs=1",
              "-S", "synth.iterations=2", "-S", "relabel.epochs=2", "-S", "evaluate.seeds=1",
              "-S", "dataset.test_size=10", "-S", "dataset.val_size=10", "-S", "relabel.min_steps=0"])
    run_stages(tmp_path, tmp_path / "params.yaml")
    assert sorted(read_json(tmp_path / "reports/observers.json")) == sorted(
        o["name"] for o in dataset_overrides("cifar10", "/r")["observers.models"])
    assert 0 <= read_json(tmp_path / "reports/metrics.json")["resnet18"]["acc_mean"] <= 1
    assert read_json(tmp_path / "condensed/shards/meta.json")["dataset"]["name"] == "cifar10"
