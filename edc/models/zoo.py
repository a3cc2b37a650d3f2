"""Small-resolution architectures (CIFAR/MNIST-sized inputs).

ResNet-18 and WRN are written here because torchvision has no width-scaled or wide variants of
them; MobileNet-V2 is written here as torchvision builds it (importing torchvision costs a second
of start-up), ShuffleNet-V2 is torchvision's module. Both have their stem adapted (input channels,
stride 1, no max-pool), which is what "small-resolution" means for them.
"""

from __future__ import annotations

import torch
from torch import nn

from edc.models.registry import register_model

_NORMS = ("batch", "instance", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        # The dataset-distillation ConvNet's "instancenorm": GroupNorm with one channel per group.
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {_NORMS}, got {kind!r}")


class ConvNet(nn.Module):
    """``depth`` x [conv3x3(width) - norm - ReLU - pool2x2], then a linear classifier."""

    CONV_BN = ()  # every convolution-BatchNorm pair is adjacent in a Sequential (edc.models.inference.fold_conv_bn)

    def __init__(self, in_channels: int, num_classes: int, image_size: int, *, width: int, depth: int,
                 norm: str, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        if image_size >> depth < 1:
            raise ValueError(f"depth {depth} halves a {image_size}px image below one pixel")
        layers: list[nn.Module] = []
        ch = in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(ch, width, 3, padding=1, bias=norm != "batch"), _norm(norm, width),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2) if pool == "avg" else nn.MaxPool2d(2)]
            ch = width
        self.features = nn.Sequential(*layers)
        side = image_size >> depth
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("convnet")
def convnet(in_channels: int, num_classes: int, image_size: int, *, width: int = 128, depth: int = 3,
            norm: str = "instance", pool: str = "avg") -> nn.Module:
    return ConvNet(in_channels, num_classes, image_size, width=width, depth=depth, norm=norm, pool=pool)


class BasicBlock(nn.Module):
    CONV_BN = (("conv1", "bn1"), ("conv2", "bn2"))  # as forward applies them (edc.models.inference.fold_conv_bn)
    # inference copies: the ReLUs, and the residual sum, inside the convolutions (edc.models.inference.fuse_activations)
    FUSE_ACT = {"conv1": ("relu", False), "conv2": ("relu", True)}
    fused = False

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:  # relu(conv2(relu(conv1(x))) + shortcut(x)), BatchNorms folded
            return self.conv2(self.conv1(x), self.shortcut(x))
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stride-1 stem, no max-pool, four stages of basic blocks."""

    CONV_BN = (("conv1", "bn1"),)  # the blocks name theirs; the shortcut's pair is a Sequential
    FUSE_ACT = {"conv1": ("relu", False)}  # inference copies (edc.models.inference.fuse_activations)
    fused = False

    def __init__(self, in_channels: int, num_classes: int, blocks: list[int], width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, cin = [], width
        for i, n in enumerate(blocks):
            cout = width << i
            stages.append(nn.Sequential(*[BasicBlock(cin if j == 0 else cout, cout, 2 if (i and j == 0) else 1)
                                          for j in range(n)]))
            cin = cout
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.conv1(x) if self.fused else torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@register_model("resnet18")
def resnet18(in_channels: int, num_classes: int, image_size: int, width: int = 64) -> nn.Module:
    """ResNet-18; ``width`` is the first stage's channel count (64 in the original)."""
    return ResNet(in_channels, num_classes, [2, 2, 2, 2], width)


class WideBlock(nn.Module):
    """Pre-activation wide basic block (Zagoruyko & Komodakis)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if (stride == 1 and cin == cout) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = torch.relu(self.bn1(x))
        y = self.conv2(torch.relu(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, depth: int, width: int):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, 28, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        groups, cin = [], widths[0]
        for i, cout in enumerate(widths[1:]):
            groups.append(nn.Sequential(*[WideBlock(cin if j == 0 else cout, cout, 2 if (i and j == 0) else 1)
                                          for j in range(n)]))
            cin = cout
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.groups(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@register_model("wrn")
def wrn(in_channels: int, num_classes: int, image_size: int, depth: int = 16, width: int = 2) -> nn.Module:
    """WRN-depth-width, e.g. the paper's WRN-16-2."""
    return WideResNet(in_channels, num_classes, depth, width)


def _restem(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, stride=1, padding=conv.padding,
                     bias=conv.bias is not None)


def _divisible(v: float, by: int = 8) -> int:
    """MobileNet's channel rounding: to the nearest multiple of ``by``, never below ``by`` nor 10 % under ``v``."""
    out = max(by, int(v + by / 2) // by * by)
    return out + by if out < 0.9 * v else out


def _conv_bn_relu6(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class _InvertedResidual(nn.Module):
    """Expand 1x1 (unless t = 1), depthwise 3x3, project 1x1 without activation; a skip when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, t: int):
        super().__init__()
        hidden = int(round(cin * t))
        expand = [_conv_bn_relu6(cin, hidden, kernel=1)] if t != 1 else []
        self.conv = nn.Sequential(*expand, _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
                                  nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.skip else self.conv(x)


# (expansion t, channels c, blocks n, first stride s) per stage: the MobileNet-V2 paper's Table 2.
_MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                        (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    """MobileNet-V2 (Sandler et al. 2018) as torchvision builds it: the same module names, parameter
    order and initialisation, so that a state dict moves between the two and a seed gives the same
    weights (a test compares them). Written here because importing torchvision imports torch._dynamo,
    more than a second of the start-up of every stage that has a MobileNet-V2 observer."""

    CONV_BN = ()  # every convolution-BatchNorm pair is adjacent in a Sequential (edc.models.inference.fold_conv_bn)

    def __init__(self, num_classes: int, width_mult: float = 1.0, dropout: float = 0.2):
        super().__init__()
        cin = _divisible(32 * width_mult)
        self.last_channel = _divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [_conv_bn_relu6(3, cin, stride=2)]
        for t, c, n, s in _MOBILENET_V2_STAGES:
            cout = _divisible(c * width_mult)
            for i in range(n):
                layers.append(_InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(_conv_bn_relu6(cin, self.last_channel, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


@register_model("mobilenet_v2")
def mobilenet_v2(in_channels: int, num_classes: int, image_size: int, width_mult: float = 1.0) -> nn.Module:
    """MobileNet-V2 with a stride-1 stem (total stride 16 instead of 32). The stem is replaced after the
    initialisation, with PyTorch's default init, as the torchvision-based version of this model did:
    observers trained before keep their bytes."""
    m = MobileNetV2(num_classes=num_classes, width_mult=width_mult)
    m.features[0][0] = _restem(m.features[0][0], in_channels)
    return m


_SHUFFLE_CHANNELS = {0.5: [24, 48, 96, 192, 1024], 1.0: [24, 116, 232, 464, 1024],
                     1.5: [24, 176, 352, 704, 1024], 2.0: [24, 244, 488, 976, 2048]}


@register_model("shufflenet_v2")
def shufflenet_v2(in_channels: int, num_classes: int, image_size: int, width_mult: float = 1.0) -> nn.Module:
    """torchvision's ShuffleNet-V2 (x0.5/1.0/1.5/2.0) with a stride-1 stem and no max-pool."""
    if width_mult not in _SHUFFLE_CHANNELS:
        raise ValueError(f"shufflenet_v2 width_mult must be one of {sorted(_SHUFFLE_CHANNELS)}, got {width_mult}")
    from torchvision.models import ShuffleNetV2  # here: importing torchvision imports torch._dynamo

    m = ShuffleNetV2([4, 8, 4], _SHUFFLE_CHANNELS[width_mult], num_classes=num_classes)
    m.conv1[0] = _restem(m.conv1[0], in_channels)
    m.maxpool = nn.Identity()
    return m


class ViT(nn.Module):
    """A small vision transformer (Dosovitskiy et al. 2021) for small images: non-overlapping
    ``patch`` x ``patch`` patches embedded by a strided convolution, a learned position embedding,
    ``depth`` pre-norm encoder layers (torch's own, GELU MLP of ``mlp_ratio`` x ``dim``), the mean
    token, LayerNorm, a linear head. No BatchNorm and no convolution hierarchy: a family none of the
    convolutional observers shares, the project's unseen student."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, *, patch: int, dim: int, depth: int,
                 heads: int, mlp_ratio: int):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"vit patch {patch} does not divide the {image_size}px image")
        if dim % heads:
            raise ValueError(f"vit dim {dim} is not a multiple of heads {heads}")
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp_ratio * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        # enable_nested_tensor only speeds up padded batches, which images never are
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.encoder(tokens).mean(1)))


@register_model("vit")
def vit(in_channels: int, num_classes: int, image_size: int, *, patch: int = 4, dim: int = 64, depth: int = 4,
        heads: int = 4, mlp_ratio: int = 2) -> nn.Module:
    return ViT(in_channels, num_classes, image_size, patch=patch, dim=dim, depth=depth, heads=heads,
               mlp_ratio=mlp_ratio)
