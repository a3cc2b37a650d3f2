"""The training loaders' batch augmentation: seeded shifts and flips on tensors, no Python loop over samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shift_flip(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``padding`` pixels (zero fill, i.e. pad-and-crop) and optional
    horizontal flip, drawn independently per image from ``generator``. ``x`` is (B, C, H, W)."""
    b, c, h, w = x.shape
    if padding > 0:
        xp = F.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        rows = (torch.arange(h)[None, :] + dy[:, None])[:, None, :, None]  # (B, 1, H, 1)
        cols = (torch.arange(w)[None, :] + dx[:, None])[:, None, None, :]  # (B, 1, 1, W)
        x = xp[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if flip:
        mask = torch.rand(b, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x
