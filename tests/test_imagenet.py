"""ImageNet observers: torchvision architectures loaded from the standard checkpoint files in the
torch hub cache (a randomly initialised model saved where torchvision would put the real one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from edc.errors import ArtifactError, ParamsError
from edc.models import create_model
from edc.models.imagenet import checkpoint_path, load_imagenet_weights
from edc.observers import load_observer
from edc.params import parse_params
from tests.helpers import stage, tiny_params, write_yaml


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def save_random_checkpoint(arch: str) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch.removeprefix("tv_"), weights=None)
    path = checkpoint_path(arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.state_dict()


@pytest.mark.parametrize("arch", ["tv_resnet18", "tv_shufflenet_v2_x0_5"])
def test_weights_come_from_the_standard_file_in_the_hub_cache(hub, arch):
    want = save_random_checkpoint(arch)
    assert checkpoint_path(arch).parent == hub and checkpoint_path(arch).suffix == ".pth"
    model = load_imagenet_weights(create_model(arch, in_channels=3, num_classes=1000, image_size=224), arch)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items()) and not model.training


def test_a_missing_checkpoint_names_the_file_expected(hub):
    with pytest.raises(ArtifactError) as e:
        load_imagenet_weights(create_model("tv_resnet18", in_channels=3, num_classes=1000, image_size=224),
                              "tv_resnet18")
    assert str(e.value).startswith(f"{hub / 'resnet18-f37072fd.pth'}: missing")
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in str(e.value)


def test_params_allow_imagenet_weights_only_for_torchvision_observers():
    p = tiny_params()
    p["observers"]["models"][0]["weights"] = "imagenet"
    with pytest.raises(ParamsError, match=r"observers.models\[0\].weights: imagenet weights exist only for the tv_"):
        parse_params(p)
    p = tiny_params()
    p["evaluate"]["students"][0]["weights"] = "imagenet"
    with pytest.raises(ParamsError, match=r"evaluate.students\[0\].weights: students are trained"):
        parse_params(p)


def test_train_observers_loads_instead_of_training(hub, tmp_path):
    save_random_checkpoint("tv_resnet18")
    rng = np.random.default_rng(0)
    src = tmp_path / "in1k.npz"  # 1,000 classes, 2 train + 1 test image each, 32 px
    y = np.repeat(np.arange(1000), 2)
    np.savez(src, x_train=rng.integers(0, 256, (2000, 32, 32, 3), dtype=np.uint8), y_train=y,
             x_test=rng.integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8), y_test=np.arange(1000))
    p = tiny_params()
    p["dataset"] = {"name": "npz", "root": str(src), "test_size": 1000}
    p["observers"]["models"] = [{"name": "r18", "arch": "tv_resnet18", "weights": "imagenet"}]
    for section, key in (("init", "observers"), ("synth", "observers"), ("relabel", "teachers")):
        p[section][key] = ["r18"]
    params = write_yaml(tmp_path / "params.yaml", p)
    stage("prepare")(["--params", str(params), "--out", str(tmp_path / "prepared")])
    stage("train_observers")(["--params", str(params), "--data", str(tmp_path / "prepared"), "--out",
                              str(tmp_path / "observers"), "--report", str(tmp_path / "observers.json"),
                              "--plots", str(tmp_path / "plots")])
    model, spec = load_observer(tmp_path / "observers", "r18")
    want = torch.load(checkpoint_path("tv_resnet18"), weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items())
    assert spec["training"] == "imagenet" and spec["arch"] == "tv_resnet18"
