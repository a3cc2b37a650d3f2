"""A set of condensed images on disk (the outputs of ``init`` and ``synthesize``).

A directory holding ``images.npy`` (uint8, (N, C, H, W), lossless), ``labels.npy`` (int64, (N,))
and ``meta.json`` (what made them; for ``init`` also the per-image provenance ``index``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from edc.errors import ArtifactError
from edc.io import read_json, write_json


def write_imageset(out: str | Path, images_u8: torch.Tensor, labels: torch.Tensor, meta: dict[str, Any]) -> None:
    out = Path(out)
    np.save(out / "images.npy", images_u8.numpy().astype(np.uint8), allow_pickle=False)
    np.save(out / "labels.npy", labels.numpy().astype(np.int64), allow_pickle=False)
    write_json(out / "meta.json", meta)


def read_imageset(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    path = Path(path)
    try:
        images = np.load(path / "images.npy", allow_pickle=False)
        labels = np.load(path / "labels.npy", allow_pickle=False)
        meta = read_json(path / "meta.json")
    except FileNotFoundError as exc:
        raise ArtifactError(f"{exc.filename}: missing from the image set {path}") from None
    except ValueError as exc:
        raise ArtifactError(f"{path}: unreadable image set ({exc})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or len(labels) != len(images):
        raise ArtifactError(f"{path}/images.npy: expected uint8 (N, C, H, W) with N labels, got {images.dtype} "
                            f"{images.shape} and {len(labels)} labels")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), meta


def save_grid(path: str | Path, images_u8: torch.Tensor, labels: torch.Tensor, num_classes: int,
              max_per_row: int = 20, pad: int = 2) -> None:
    """A PNG with one row per class (up to ``max_per_row`` images each)."""
    from PIL import Image

    n, c, h, w = images_u8.shape
    cols = min(max_per_row, max(int((labels == k).sum()) for k in range(num_classes)))
    canvas = np.full((num_classes * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k in range(num_classes):
        for j, i in enumerate(torch.nonzero(labels == k).flatten()[:cols].tolist()):
            y0, x0 = pad + k * (h + pad), pad + j * (w + pad)
            canvas[y0:y0 + h, x0:x0 + w] = images_u8[i].permute(1, 2, 0).numpy()
    Image.fromarray(canvas[..., 0] if c == 1 else canvas).save(path, format="PNG")


def save_comparison(path, init_u8: torch.Tensor, out_u8: torch.Tensor, labels: torch.Tensor,
                    class_names: list[str], *, per_class: int = 8, scale: int = 2, pad: int = 2) -> None:
    """A PNG with one row per class: its name, then up to ``per_class`` initial images, a gap, and the
    same images after synthesis (each ``scale`` times enlarged): what synthesis changed, at a glance."""
    from PIL import Image, ImageDraw

    n, c, h, w = out_u8.shape
    k = len(class_names)
    cols = min(per_class, max(int((labels == j).sum()) for j in range(k)))
    hs, ws = h * scale, w * scale
    label_w, gap = 8 + 7 * min(max(len(str(name)) for name in class_names), 14), 3 * pad + 6
    width = label_w + 2 * cols * (ws + pad) + gap
    height = 16 + k * (hs + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((label_w, 2), "initial", fill="black")
    draw.text((label_w + cols * (ws + pad) + gap, 2), "synthesized", fill="black")

    def tile(img: torch.Tensor) -> Image.Image:
        arr = img.permute(1, 2, 0).numpy()
        im = Image.fromarray(arr[..., 0] if c == 1 else arr).convert("RGB")
        return im.resize((ws, hs), Image.Resampling.NEAREST)

    for j in range(k):
        y0 = 16 + j * (hs + pad)
        draw.text((4, y0 + hs // 2 - 5), str(class_names[j])[:14], fill="black")
        for col, i in enumerate(torch.nonzero(labels == j).flatten()[:cols].tolist()):
            x0 = label_w + col * (ws + pad)
            canvas.paste(tile(init_u8[i]), (x0, y0))
            canvas.paste(tile(out_u8[i]), (x0 + cols * (ws + pad) + gap, y0))
    canvas.save(path, format="PNG")

