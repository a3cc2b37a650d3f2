"""RandAugment as part of a relabel plan: the operations and magnitudes are drawn once, stored with the
plan, and replayed, so that the teachers label exactly the view a student later sees.

RandAugment (Cubuk et al. 2020; the EDC paper's post-evaluation augmentation for small images,
Tables 7-10) applies ``num_ops`` operations drawn uniformly from :data:`OPS` to each view, each at
one magnitude bin ``m`` of 0-30 with a random sign where the operation has a direction. The plan
stores, per view and operation, the operation's index and its signed bin (:func:`sample_ops`, two
int columns each); :func:`apply_ops` turns them into pixels. Magnitudes follow torchvision's
``RandAugment`` (31 bins): shear up to 0.3, translation up to 150/331 of the side, rotation up to 30
degrees, brightness/colour/contrast/sharpness factors 1 +- 0.9, posterize 8 down to 4 bits,
solarize threshold 1 down to 0. The operations run on 8-bit pixels, as torchvision's do, through
``torchvision.transforms.v2.functional``.
"""

from __future__ import annotations

import math

import torch

OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
       "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
SIGNED = {"shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast",
          "sharpness"}
BINS = 31


def sample_ops(n: int, num_ops: int, magnitude: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 2 * num_ops) int64: for each view, ``num_ops`` pairs (operation index, signed magnitude bin)."""
    ops = torch.randint(len(OPS), (n, num_ops), generator=gen)
    sign = torch.where(torch.rand(n, num_ops, generator=gen) < 0.5, -1, 1)
    signed = torch.tensor([name in SIGNED for name in OPS])[ops]
    mags = torch.where(signed, sign * magnitude, torch.full_like(ops, magnitude))
    return torch.stack([ops, mags], 2).reshape(n, 2 * num_ops)


def _one(img: torch.Tensor, op: str, m: int) -> torch.Tensor:
    """One operation at signed bin ``m`` on a (C, H, W) uint8 image."""
    # Imported here, not at the top: every stage that reads a plan imports this module, RandAugment on
    # or off, and torchvision's import (which loads torch._dynamo) is a large part of a stage's start-up.
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    frac = abs(m) / (BINS - 1)
    sign = -1.0 if m < 0 else 1.0
    h, w = img.shape[-2:]
    nearest = InterpolationMode.NEAREST
    if op in ("shear_x", "shear_y"):
        deg = math.degrees(math.atan(sign * 0.3 * frac))
        shear = [deg, 0.0] if op == "shear_x" else [0.0, deg]
        return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=nearest, fill=0,
                         center=[0, 0])
    if op in ("translate_x", "translate_y"):
        side = w if op == "translate_x" else h
        d = int(sign * 150.0 / 331.0 * side * frac)
        return TF.affine(img, angle=0.0, translate=[d, 0] if op == "translate_x" else [0, d], scale=1.0,
                         shear=[0.0, 0.0], interpolation=nearest, fill=0)
    if op == "rotate":
        return TF.rotate(img, sign * 30.0 * frac, interpolation=nearest, fill=0)
    factor = 1.0 + sign * 0.9 * frac
    if op == "brightness":
        return TF.adjust_brightness(img, factor)
    if op == "color":
        return TF.adjust_saturation(img, factor) if img.shape[0] == 3 else img
    if op == "contrast":
        return TF.adjust_contrast(img, factor)
    if op == "sharpness":
        return TF.adjust_sharpness(img, factor)
    if op == "posterize":
        return TF.posterize(img, 8 - round(abs(m) / ((BINS - 1) / 4)))
    if op == "solarize":
        return TF.solarize(img, 255.0 * (1.0 - frac))
    if op == "autocontrast":
        return TF.autocontrast(img)
    if op == "equalize":
        return TF.equalize(img)
    return img


def apply_ops(x: torch.Tensor, cols: torch.Tensor, mean, std) -> torch.Tensor:
    """The planned operations ``cols`` ((B, 2 * num_ops), :func:`sample_ops`) applied to a batch ``x``
    (B, C, H, W) normalised with the dataset's ``mean`` and ``std`` (C values each): back to 8-bit pixels, the
    operations in order, normalised again."""
    m, s = (torch.as_tensor(v, dtype=x.dtype, device=x.device)[None, :, None, None] for v in (mean, std))
    u8 = ((x * s + m).clamp(0, 1) * 255).round().to(torch.uint8)
    out = []
    for img, row in zip(u8, cols.tolist()):
        for k in range(0, len(row), 2):
            img = _one(img, OPS[row[k]], row[k + 1])
        out.append(img)
    return (torch.stack(out).to(x.dtype) / 255 - m) / s
