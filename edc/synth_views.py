"""Synthesis's views of its images: per-image random resized crops and flips, differentiable and drawn
for the whole batch in one call, or SRe2L's jitter. The statistics targets (edc/stats.py) are
measured on the same views."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edc.params import SynthAugParams


@dataclass(frozen=True)
class CropFlip:
    scale_w: torch.Tensor  # (B,) crop width as a fraction of the image width
    scale_h: torch.Tensor
    center_x: torch.Tensor  # (B,) crop centre in [-1, 1] coordinates
    center_y: torch.Tensor
    flip: torch.Tensor  # (B,) bool


def sample_crop_flip(b: int, scale_min: float, flip: bool, gen: torch.Generator,
                     ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> CropFlip:
    """RandomResizedCrop's distribution (area fraction in [scale_min, 1], log-uniform aspect ratio),
    with sides clamped to the image instead of retried."""
    area = scale_min + (1 - scale_min) * torch.rand(b, generator=gen)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(b, generator=gen)
    r = log_r.exp()
    sw, sh = (area * r).sqrt().clamp(max=1.0), (area / r).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - sw)
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - sh)
    fl = torch.rand(b, generator=gen) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    return CropFlip(sw, sh, cx, cy, fl)


def apply_crop_flip(x: torch.Tensor, t: CropFlip) -> torch.Tensor:
    """Crop each image's box and resize it back to the full size (bilinear), flipping where drawn."""
    theta = torch.zeros(len(x), 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = torch.where(t.flip, -t.scale_w, t.scale_w)
    theta[:, 0, 2] = t.center_x
    theta[:, 1, 1] = t.scale_h
    theta[:, 1, 2] = t.center_y
    theta = theta.to(x.device)  # drawn on the CPU generator: the same draws on any device
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --- synthesis's views: the crop above, or SRe2L's jitter (a random roll of the whole batch) ---

@dataclass(frozen=True)
class Jitter:
    dy: int  # rows rolled down (negative: up); one shift for the whole batch, as SRe2L's recover draws it
    dx: int  # columns rolled right
    flip: torch.Tensor  # (B,) bool


def sample_jitter(b: int, jitter: int, flip: bool, gen: torch.Generator) -> Jitter:
    """A roll of up to ``jitter`` pixels along each axis (uniform over [-jitter, jitter]) and a flip per
    image where ``flip``."""
    dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=gen))
    fl = torch.rand(b, generator=gen) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    return Jitter(dy, dx, fl)


def apply_jitter(x: torch.Tensor, t: Jitter) -> torch.Tensor:
    """Roll (wrap around, no fill) ``x`` (B, C, H, W) by (dy, dx), then flip the drawn images."""
    x = torch.roll(x, shifts=(t.dy, t.dx), dims=(2, 3))
    if t.flip.any():
        x = torch.where(t.flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    return x


def sample_view(b: int, aug: SynthAugParams, gen: torch.Generator) -> CropFlip | Jitter:
    """One draw of the ``synth.aug`` views for ``b`` images: a crop (:func:`sample_crop_flip`, the same
    draws as before ``kind`` existed) or a jitter (:func:`sample_jitter`)."""
    if aug.kind == "jitter":
        return sample_jitter(b, aug.jitter, aug.flip, gen)
    return sample_crop_flip(b, aug.scale_min, aug.flip, gen)


def apply_view(x: torch.Tensor, t: CropFlip | Jitter) -> torch.Tensor:
    return apply_jitter(x, t) if isinstance(t, Jitter) else apply_crop_flip(x, t)


def view_record(aug: SynthAugParams) -> dict:
    """The ``synth.aug`` settings a statistics file records: the crop's keys alone for ``kind: crop``, so
    that files made before ``kind`` existed still match."""
    d = aug.model_dump()
    if d.get("kind", "crop") == "crop":
        d.pop("kind", None)
        d.pop("jitter", None)
    return d
