"""Initialisation of the condensed set: ``rded``, ``real`` and ``noise``.

``rded`` (RDED, Sun et al. 2024; EDC's "real image initialisation"): per class, sample ``candidates``
real images; from each take ``crops`` random crops (RandomResizedCrop boxes: area fraction in
[``scale_min``, 1], aspect ratio in [3/4, 4/3]; ``scale_min`` 1 = the whole image); score every crop by
the cross-entropy of the observers' mean logits on the crop resized to full size; keep each image's
best (lowest-loss) crop, then the class's best ``ipc * f * f`` crops, downsample each to a tile of
(ceil(H/f), ceil(W/f)) (bilinear, antialiased) and stitch them f x f (in rank order, row-major) into
``ipc`` images. So with f = 2 every image holds four whole real objects at half resolution, as RDED's
stitched images do. When f does not divide the side, the stitched image is trimmed to (H, W). f = 1
keeps the best crops at full size (with ``scale_min`` 1: the best whole images).

Images are read class chunk by class chunk (``batch_size`` candidate images at a time) from a split
that may be an image folder decoded on the fly, so memory does not grow with the dataset or K.

Every returned image carries its provenance: the train-split indices of its source images, the crop
boxes ``[top, left, height, width]`` in source-image pixels, and the crops' scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edc.data import as_split
from edc.errors import DataError
from edc.params import InitParams
from edc.plan import crop_resize
from edc.progress import progress
from edc.runtime import model_device


@dataclass
class InitResult:
    images: torch.Tensor  # (N, C, H, W), normalised space
    labels: torch.Tensor  # (N,) int64, sorted by class
    index: list[dict]  # one provenance record per image


def _per_class_sample(labels: torch.Tensor, k: int, n: int, gen: torch.Generator, what: str) -> torch.Tensor:
    """(K, n) train indices: n distinct images of each class, drawn with ``gen``."""
    rows = []
    for c in range(k):  # K small index draws; the heavy work below is batched over all classes
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < n:
            raise DataError(f"{what}: class {c} has {len(idx)} train images, {n} are needed")
        rows.append(idx[torch.randperm(len(idx), generator=gen)[:n]])
    return torch.stack(rows)


def real_init(images, labels: torch.Tensor | None, k: int, ipc: int, gen: torch.Generator) -> InitResult:
    """``ipc`` random real images per class (``images``: a tensor with ``labels``, or a SplitView)."""
    src = as_split(images, labels)
    y = src.labels
    idx = _per_class_sample(y, k, ipc, gen, "ipc").flatten()
    x = src.take(idx).clone()
    h, w = x.shape[2:]
    index = [{"class": int(y[i]), "sources": [int(i)], "boxes": [[0, 0, h, w]], "scores": []} for i in idx]
    return InitResult(x, y[idx].clone(), index)


def noise_init(shape: tuple[int, int, int], k: int, ipc: int, gen: torch.Generator) -> InitResult:
    """Standard Gaussian images in the normalised space (SRe2L / G-VBSM's initialisation)."""
    labels = torch.arange(k).repeat_interleave(ipc)
    images = torch.randn(k * ipc, *shape, generator=gen)
    return InitResult(images, labels, [{"class": int(c), "sources": [], "boxes": [], "scores": []} for c in labels])


@torch.no_grad()
def crop_scores(crops: torch.Tensor, labels: torch.Tensor, observers: list[nn.Module], size: tuple[int, int],
                batch_size: int = 500) -> torch.Tensor:
    """Cross-entropy of the observers' mean logits on each crop resized to ``size`` (lower = better)."""
    out = torch.empty(len(crops))
    dev = model_device(observers[0])
    for i in range(0, len(crops), batch_size):
        xb = F.interpolate(crops[i:i + batch_size].to(dev), size=size, mode="bilinear", align_corners=False)
        logits = torch.stack([m(xb) for m in observers]).mean(0)
        out[i:i + batch_size] = F.cross_entropy(logits, labels[i:i + batch_size].to(dev), reduction="none").cpu()
    return out


def crop_boxes(n: int, h: int, w: int, scale_min: float, gen: torch.Generator) -> torch.Tensor:
    """(n, 4) integer boxes [top, left, height, width] drawn as RandomResizedCrop draws them (area
    fraction uniform in [scale_min, 1], log-uniform aspect ratio in [3/4, 4/3], sides clamped to the
    image); ``scale_min`` 1 gives the whole image."""
    if scale_min >= 1:
        return torch.tensor([0, 0, h, w]).repeat(n, 1)
    area = (scale_min + (1 - scale_min) * torch.rand(n, generator=gen)) * h * w
    log_r = math.log(3 / 4) + math.log(16 / 9) * torch.rand(n, generator=gen)
    bw = (area * log_r.exp()).sqrt().round().clamp(1, w).long()
    bh = (area / log_r.exp()).sqrt().round().clamp(1, h).long()
    top = (torch.rand(n, generator=gen) * (h - bh + 1)).floor().long()
    left = (torch.rand(n, generator=gen) * (w - bw + 1)).floor().long()
    return torch.stack([top, left, bh, bw], 1)


def downsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x`` (N, C, H, W) resized to ``size`` (bilinear, antialiased); unchanged when already that size."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def rded_init(images, labels: torch.Tensor | None, observers: list[nn.Module], cfg: InitParams, *, k: int, ipc: int,
              gen: torch.Generator) -> InitResult:
    """RDED (module docstring) for ``k`` classes, ``ipc`` images each, under the ``init`` params ``cfg``;
    ``images``: a tensor with ``labels``, or a SplitView read in chunks."""
    candidates, crops, factor = cfg.candidates, cfg.crops, cfg.factor
    src_split = as_split(images, labels)
    y = src_split.labels
    f2 = factor * factor
    if candidates < ipc * f2:
        raise DataError(f"init.candidates: {candidates} candidates cannot fill ipc*factor^2 = {ipc * f2} tiles")
    src = _per_class_sample(y, k, candidates, gen, "init.candidates")  # (K, P)
    first = src_split.take(src[0, :1])
    _, c, h, w = first.shape
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    boxes = crop_boxes(k * candidates * crops, h, w, cfg.scale_min, gen).view(k, candidates, crops, 4)
    for m in observers:
        m.eval()
    scores = torch.empty(k, candidates, crops)
    rank = torch.empty(k, ipc * f2, dtype=torch.int64)  # (K, ipc*f2) candidates, best first
    crop_of = torch.empty(k, ipc * f2, dtype=torch.int64)
    tiles = torch.empty(k, ipc * f2, c, ch, cw)
    per_chunk = max(1, cfg.batch_size // (candidates * crops))  # classes whose candidates are read at once
    for c0 in progress(range(0, k, per_chunk), desc="scoring crops", unit="chunk"):
        c1 = min(k, c0 + per_chunk)
        nk = c1 - c0
        x = src_split.take(src[c0:c1].flatten())  # (nk*P, C, H, W)
        # Every crop of the chunk resized to full size at once: (nk*P*R, C, H, W); whole-image boxes
        # are the images themselves, not a resampling of them.
        b = boxes[c0:c1].reshape(-1, 4)
        patches = x.repeat_interleave(crops, 0)
        whole = (b[:, 2] == h) & (b[:, 3] == w)
        if not whole.all():
            patches = torch.where(whole[:, None, None, None], patches, crop_resize(patches, *b.T))
        cls = torch.arange(c0, c1).repeat_interleave(candidates * crops)
        sc = crop_scores(patches, cls, observers, (h, w), cfg.batch_size).view(nk, candidates, crops)
        best_crop = sc.argmin(2)  # (nk, P): each candidate's best crop
        best_score = sc.gather(2, best_crop[..., None]).squeeze(2)
        r = torch.argsort(best_score, dim=1, stable=True)[:, : ipc * f2]
        co = best_crop.gather(1, r)
        flat = (torch.arange(nk)[:, None] * candidates + r) * crops + co  # indices into patches
        scores[c0:c1], rank[c0:c1], crop_of[c0:c1] = sc, r, co
        tiles[c0:c1] = downsample(patches[flat.reshape(-1)], (ch, cw)).view(nk, ipc * f2, c, ch, cw)
    tiles = tiles.view(k, ipc, factor, factor, c, ch, cw)
    images = tiles.permute(0, 1, 4, 2, 5, 3, 6).reshape(k * ipc, c, factor * ch, factor * cw)[:, :, :h, :w]
    index = []
    for cl in range(k):
        for j in range(ipc):
            sel = slice(j * f2, (j + 1) * f2)
            cands, cr = rank[cl, sel], crop_of[cl, sel]
            index.append({
                "class": cl,
                "sources": src[cl, cands].tolist(),
                "boxes": [boxes[cl, p, r].tolist() for p, r in zip(cands, cr)],
                "scores": [round(float(scores[cl, p, r]), 6) for p, r in zip(cands, cr)],
            })
    return InitResult(images.contiguous(), torch.arange(k).repeat_interleave(ipc), index)
