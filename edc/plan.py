"""The augmentation plan of a condensed set: part of the format (``edc.shards`` replays it).

For every post-evaluation epoch a plan fixes the order of the images, their batches, each image's
RandomResizedCrop box and flip, its RandAugment operations and magnitudes where enabled, and (with
CutMix) each batch's box and each image's partner.
``augment`` is the one function that turns images and a plan into the augmented batch; the relabel
stage (which stores the teachers' logits on it) and every reader of a set (which replays it) both
call it, which is what makes the stored labels belong to what the student sees. This module
imports nothing of the method: reading a set needs only it and :mod:`edc.shards`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edc.randaugment import apply_ops, sample_ops

CROP_FIELDS = ("top", "left", "height", "width", "flip")
MIX_FIELDS = ("partner", "x1", "y1", "x2", "y2")


@dataclass(frozen=True)
class EpochPlan:
    order: torch.Tensor  # (N,) int64: image ids in visiting order; batches are consecutive slices
    crops: torch.Tensor  # (N, 5) int64, aligned with order: top, left, height, width, flip
    mix: torch.Tensor | None  # (N, 5) int64: partner position within the batch, CutMix box x1, y1, x2, y2


def planned_epochs(epochs: int, min_steps: int, num_images: int, batch_size: int) -> int:
    """The epochs a plan covers: ``epochs``, or more when that many epochs would give fewer than
    ``min_steps`` optimiser steps (``ceil(num_images / batch_size)`` per epoch). With the defaults
    (200 epochs, 1,000 steps, batch 25) ipc 1 on 10 classes gets 1,000 epochs (the paper's), ipc 10
    gets 250 and ipc 50 keeps 200."""
    per_epoch = -(-num_images // batch_size)
    return max(epochs, -(-min_steps // per_epoch))


def stored_epochs(label_epochs: int, epochs: int, label_views: int = 0, ipc: int = 1) -> int:
    """How many epochs of views and labels a set stores, at most ``epochs``: ``label_epochs`` when set;
    else enough epochs for ``label_views`` labelled views per class, ``ceil(label_views / ipc)`` (an
    epoch shows each of a class's ``ipc`` images once); else (both 0) one per training epoch.

    A budget in views per class rather than in epochs is what one recipe needs across ipc: at ipc 1
    each epoch holds one view per class and every stored epoch counts, at ipc 10 an epoch holds ten and
    a fraction of the epochs gives the same views per class (docs/format.md)."""
    if label_epochs:
        return min(label_epochs, epochs)
    if label_views:
        return min(-(-label_views // max(ipc, 1)), epochs)
    return epochs


def stored_epoch(epoch: int, stored: int) -> int:
    """The stored epoch training epoch ``epoch`` replays, views and labels together: the stored epochs
    in order, again and again (epoch ``stored`` replays epoch 0). A label is only ever read with the
    views it was computed on, because the plan of the stored epoch is the plan of every epoch that
    replays it."""
    return epoch % stored


def sample_boxes(n: int, h: int, w: int, scale: tuple[float, float], gen: torch.Generator,
                 *, ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop's boxes for n images, vectorised: up to ``attempts`` draws of area fraction
    in ``scale`` and log-uniform aspect ratio, the first that fits; else the whole image (as
    torchvision's fallback does for ratios inside ``ratio``). Returns (n, 4) top, left, height, width."""
    area = (scale[0] + (scale[1] - scale[0]) * torch.rand(n, attempts, generator=gen)) * (h * w)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(n, attempts, generator=gen)
    r = log_r.exp()
    bw = (area * r).sqrt().round().long()
    bh = (area / r).sqrt().round().long()
    ok = (bw > 0) & (bw <= w) & (bh > 0) & (bh <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    pick = first.clamp_min(0)
    bw = torch.where(first >= 0, bw[rows, pick], torch.full((n,), w))
    bh = torch.where(first >= 0, bh[rows, pick], torch.full((n,), h))
    top = (torch.rand(n, generator=gen) * (h - bh + 1)).floor().long()
    left = (torch.rand(n, generator=gen) * (w - bw + 1)).floor().long()
    return torch.stack([top, left, bh, bw], 1)


def cutmix_box(h: int, w: int, gen: torch.Generator, beta: float = 1.0) -> torch.Tensor:
    """torchvision's CutMix box: lam ~ Beta(beta, beta), a centre drawn uniformly, sides sqrt(1 - lam)
    of the image, clipped to it. Returns x1, y1, x2, y2."""
    lam = torch.distributions.Beta(beta, beta).sample() if beta != 1.0 else torch.rand((), generator=gen)
    cx, cy = int(torch.randint(w, (), generator=gen)), int(torch.randint(h, (), generator=gen))
    r = 0.5 * math.sqrt(1.0 - float(lam))
    hw, hh = int(r * w), int(r * h)
    return torch.tensor([max(cx - hw, 0), max(cy - hh, 0), min(cx + hw, w), min(cy + hh, h)])


def make_plan(n: int, h: int, w: int, batch_size: int, scale_min: float, flip: bool, *, cutmix: bool,
              gen: torch.Generator, randaugment: int = 0, magnitude: int = 9) -> EpochPlan:
    """One epoch's plan for n images of size (h, w); with ``randaugment`` operations per view, their
    draws (:func:`edc.randaugment.sample_ops`) are columns 5 onwards of the crops, drawn after
    everything else so that a plan without them is the same as before they existed."""
    order = torch.randperm(n, generator=gen)
    boxes = sample_boxes(n, h, w, (scale_min, 1.0), gen)
    flips = (torch.rand(n, generator=gen) < 0.5).long() if flip else torch.zeros(n, dtype=torch.long)
    mix = None
    if cutmix:
        mix = torch.empty(n, 5, dtype=torch.long)
        for start in range(0, n, batch_size):  # one box per batch, partner = the batch rolled by one
            b = min(batch_size, n - start)
            mix[start:start + b, 0] = (torch.arange(b) - 1) % b
            mix[start:start + b, 1:] = cutmix_box(h, w, gen)
    crops = torch.cat([boxes, flips[:, None]], 1)
    if randaugment:
        crops = torch.cat([crops, sample_ops(n, randaugment, magnitude, gen)], 1)
    return EpochPlan(order, crops, mix)


def crop_resize(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: torch.Tensor,
                width: torch.Tensor) -> torch.Tensor:
    """Each image's box (pixel rows ``top`` to ``top + height``, columns likewise) resized back to the
    full (H, W), bilinear, one sample per output pixel at its centre (as ``resize`` with
    ``align_corners=False``): output column j samples x = left + (j + 0.5) * width / W - 0.5,
    clamped to the image's edge pixels."""
    b, _, h, w = images.shape
    dt = images.dtype

    def coords(start, size, n):  # (B, n) sample positions, in grid_sample's [-1, 1] (align_corners=False)
        pos = start.to(dt)[:, None] + (torch.arange(n, dtype=dt) + 0.5)[None] * (size.to(dt)[:, None] / n) - 0.5
        return (2 * pos + 1) / n - 1

    xs, ys = coords(left, width, w), coords(top, height, h)
    grid = torch.stack([xs[:, None, :].expand(b, h, w), ys[:, :, None].expand(b, h, w)], -1)
    return F.grid_sample(images, grid.to(images.device), mode="bilinear", padding_mode="border", align_corners=False)


def augment(images: torch.Tensor, crops: torch.Tensor, mix: torch.Tensor | None,
            pixels: tuple | None = None) -> torch.Tensor:
    """Apply planned crops (resized back to full size, bilinear), flips, RandAugment and CutMix to a batch.

    ``images`` (B, C, H, W) are the batch's images in plan order; ``crops`` (B, 5) and ``mix`` (B, 5)
    the plan's rows for them. Crops with more than 5 columns carry RandAugment's operations
    (:mod:`edc.randaugment`), which need ``pixels``, the dataset's (mean, std) the images are
    normalised with."""
    b, _, h, w = images.shape
    x = crop_resize(images, *crops[:, :4].T)
    x = torch.where(crops[:, 4].bool()[:, None, None, None], x.flip(-1), x)
    if crops.shape[1] > 5:
        if pixels is None:
            raise ValueError("the plan holds RandAugment operations: pass pixels=(mean, std) of the dataset")
        x = apply_ops(x, crops[:, 5:], *pixels)
    if mix is not None:
        partner, x1, y1, x2, y2 = mix.T
        ys, xs = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
        inside = (ys >= y1[:, None, None]) & (ys < y2[:, None, None]) & (xs >= x1[:, None, None]) & \
            (xs < x2[:, None, None])
        x = torch.where(inside[:, None], x[partner], x)
    return x


def batches(plan: EpochPlan, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(image ids, crops, mix) for each batch of an epoch plan."""
    for start in range(0, len(plan.order), batch_size):
        sl = slice(start, start + batch_size)
        yield plan.order[sl], plan.crops[sl], None if plan.mix is None else plan.mix[sl]
