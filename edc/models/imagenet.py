"""torchvision's ImageNet architectures, as published, for observers loaded from standard checkpoints.

``tv_resnet18``, ``tv_mobilenet_v2``, ``tv_efficientnet_b0``, ``tv_shufflenet_v2_x0_5`` and
``tv_alexnet`` are torchvision's models unchanged (stride-2 stems, 224-pixel inputs). An observer
with ``weights: imagenet`` in params.yaml is not trained: ``train_observers`` loads the checkpoint
file torchvision itself downloads to the torch hub cache (``$TORCH_HOME/hub/checkpoints/``, default
``~/.cache/torch/hub/checkpoints/``), so a machine without internet access works from a copied cache.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edc.errors import ArtifactError
from edc.models.registry import register_model

TORCHVISION = ("resnet18", "mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5", "alexnet")


def _register(name: str) -> None:
    def builder(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
        import torchvision.models as tvm

        if in_channels != 3:
            raise ValueError(f"tv_{name} takes 3-channel images, the dataset has {in_channels}")
        return tvm.get_model(name, weights=None, num_classes=num_classes)

    builder.__doc__ = f"torchvision's {name} (ImageNet architecture, unchanged)"
    register_model(f"tv_{name}")(builder)


for _name in TORCHVISION:
    _register(_name)


class _RepeatChannels(nn.Module):
    """Grey images for a 3-channel network: the one channel repeated."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@register_model("torchvision")
def torchvision_model(in_channels: int, num_classes: int, image_size: int, name: str = "resnet18") -> nn.Module:
    """Any torchvision classification model by name (``torchvision.models.list_models``), untrained,
    with ``num_classes`` outputs; grey images are repeated to 3 channels. For evaluating a condensed
    set on architectures outside this registry (``edc evaluate --archs torchvision:resnet50``)."""
    import torchvision.models as tvm

    known = tvm.list_models(module=tvm)
    if name not in known:
        raise ValueError(f"torchvision has no classification model {name!r} (e.g. {', '.join(known[:6])}, ...)")
    if in_channels not in (1, 3):
        raise ValueError(f"torchvision:{name} takes 1- or 3-channel images, the dataset has {in_channels}")
    net = tvm.get_model(name, weights=None, num_classes=num_classes)
    return nn.Sequential(_RepeatChannels(), net) if in_channels == 1 else net


def checkpoint_url(arch: str) -> str:
    """The URL torchvision downloads ``arch``'s default ImageNet weights from."""
    import torchvision.models as tvm

    if not arch.startswith("tv_") or arch[3:] not in TORCHVISION:
        raise ArtifactError(f"{arch}: ImageNet weights exist only for {', '.join('tv_' + n for n in TORCHVISION)}")
    return tvm.get_model_weights(arch[3:]).DEFAULT.url


def checkpoint_path(arch: str) -> Path:
    """Where torchvision keeps that checkpoint in the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / checkpoint_url(arch).rsplit("/", 1)[1]


def load_imagenet_weights(model: nn.Module, arch: str) -> nn.Module:
    """Load the standard checkpoint file of ``arch`` from the hub cache into ``model`` (no download)."""
    path = checkpoint_path(arch)
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; the ImageNet weights of {arch} are expected there (download "
                            f"{checkpoint_url(arch)} on a machine with internet access, or set TORCH_HOME)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ArtifactError(f"{path}: unreadable checkpoint ({exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{path}: does not fit {arch} ({str(exc).strip().splitlines()[0]})") from None
    return model.eval()
