"""Model registry: every architecture builds for any channel count, image size and class count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edc.models import create_model, list_models, model_kwargs
from edc.stats import bn_layers


@pytest.mark.parametrize("arch", [a for a in list_models() if not a.startswith("tv_")])
@pytest.mark.parametrize("channels, size, classes", [(1, 28, 10), (3, 32, 100), (3, 16, 7)])
def test_every_architecture_builds_and_runs(arch, channels, size, classes):
    kwargs = {"width": 8} if arch in ("convnet", "resnet18") else {}
    if arch in ("mobilenet_v2", "shufflenet_v2"):
        kwargs = {"width_mult": 0.5}
    model = create_model(arch, in_channels=channels, num_classes=classes, image_size=size, **kwargs).eval()
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, classes)


@pytest.mark.parametrize("arch", [a for a in list_models() if a.startswith("tv_")])
def test_torchvision_imagenet_architectures_build_unchanged(arch):
    model = create_model(arch, in_channels=3, num_classes=10, image_size=64).eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    with pytest.raises(ValueError, match="takes 3-channel images"):
        create_model(arch, in_channels=1, num_classes=10, image_size=64)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "shufflenet_v2", "wrn"])
def test_small_resolution_stems_keep_full_resolution(arch):
    """The first convolution is stride 1 and no max-pool follows it (small-resolution variants)."""
    model = create_model(arch, in_channels=3, num_classes=10, image_size=32)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.stride == (1, 1) and first.in_channels == 3
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert bn_layers(model), f"{arch} has BatchNorm layers to match"


@pytest.mark.parametrize("width_mult", [0.5, 1.0, 0.35])
def test_our_mobilenet_v2_is_torchvisions_weight_for_weight(width_mult):
    """Our MobileNet-V2 (written to spare stages torchvision's import) builds what torchvision builds: the
    same parameter names, shapes and, from one seed, values, the same eval output, and with the stem
    adapted the same weights as the torchvision-based model had (observers keep their bytes)."""
    from torchvision.models import MobileNetV2 as TV

    from edc.models.zoo import MobileNetV2, _restem

    torch.manual_seed(3)
    theirs = TV(num_classes=7, width_mult=width_mult)
    theirs.features[0][0] = _restem(theirs.features[0][0], 1)
    torch.manual_seed(3)
    ours = create_model("mobilenet_v2", in_channels=1, num_classes=7, image_size=28, width_mult=width_mult)
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(theirs.eval()(x), ours.eval()(x))
    torch.manual_seed(3)
    plain = MobileNetV2(num_classes=5, width_mult=width_mult)
    torch.manual_seed(3)
    tv_plain = TV(num_classes=5, width_mult=width_mult)
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), tv_plain.parameters()))
    assert [type(m).__name__ for m in plain.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU6))] \
        == [type(m).__name__ for m in tv_plain.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU6))]


def test_convnet_norm_variants():
    kinds = {norm: create_model("convnet", in_channels=1, num_classes=10, image_size=28, width=16, norm=norm)
             for norm in ("batch", "instance", "none")}
    assert len(bn_layers(kinds["batch"])) == 3
    assert not bn_layers(kinds["instance"]) and not bn_layers(kinds["none"])
    assert any(isinstance(m, nn.GroupNorm) for m in kinds["instance"].modules())


def test_resnet18_depth_and_width():
    model = create_model("resnet18", in_channels=3, num_classes=10, image_size=32, width=16)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 17  # stem + 8 blocks x 2
    assert model.fc.in_features == 16 * 8


def test_unknown_argument_and_architecture_are_clear():
    with pytest.raises(TypeError, match=r"resnet18: unknown argument\(s\) \['depth'\]"):
        create_model("resnet18", in_channels=1, num_classes=10, image_size=28, depth=3)
    with pytest.raises(KeyError, match="unknown architecture 'vgg'"):
        model_kwargs("vgg")
    with pytest.raises(ValueError, match="6n\\+4"):
        create_model("wrn", in_channels=1, num_classes=10, image_size=28, depth=15)


def test_device_auto_is_the_cpu_here_and_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    from edc.errors import ParamsError
    from edc.runtime import autocast, place, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    with pytest.raises(ParamsError, match="device: cuda, but torch.cuda.is_available.. is False"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    # On the CPU neither placement nor autocast changes anything: CPU results do not depend on GPU code.
    model = torch.nn.Conv2d(3, 4, 3)
    w = model.weight.clone()
    assert place(model, torch.device("cpu")) is model and torch.equal(model.weight, w)
    assert model.weight.is_contiguous()
    with autocast(torch.device("cpu"), True):
        assert model(torch.randn(1, 3, 5, 5)).dtype == torch.float32


def test_vit_is_outside_the_observers_families_and_checks_its_shape():
    """The unseen student: no BatchNorm for synthesis to have matched, no convolution after the patch
    embedding; a patch that does not tile the image is named."""
    model = create_model("vit", in_channels=1, num_classes=10, image_size=28)
    assert not bn_layers(model) and sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 1
    x = torch.randn(2, 1, 28, 28)
    # the position embedding makes the patches' order matter: swapping two patches changes the output
    y = x.clone()
    y[:, :, :4, :4], y[:, :, :4, 4:8] = x[:, :, :4, 4:8], x[:, :, :4, :4]
    assert not torch.allclose(model.eval()(x), model(y))
    with pytest.raises(ValueError, match="patch 5 does not divide the 28px image"):
        create_model("vit", in_channels=1, num_classes=10, image_size=28, patch=5)
    # as a student of params.yaml: one line naming the architecture, its arguments and the data
    from edc.data import DatasetFacts
    from edc.errors import EdcError
    from edc.models import build

    facts = DatasetFacts(name="toy", channels=3, height=32, width=32, num_classes=4, class_names=list("abcd"),
                         mean=[0.5] * 3, std=[0.2] * 3, counts={"train": [5] * 4, "test": [2] * 4})
    with pytest.raises(EdcError) as exc:
        build("vit", {"patch": 7}, facts)
    assert str(exc.value) == "vit {'patch': 7} on toy (32px): vit patch 7 does not divide the 32px image"
