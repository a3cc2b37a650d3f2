"""Initialisation: RDED crop scoring and stitching, traced back to the real images; real and noise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edc.errors import DataError
from edc.init import noise_init, rded_init, real_init
from edc.params import InitParams
from edc.plan import crop_resize


class Brightness(nn.Module):
    """A hand-made observer: class c's logit is the mean of row band c, so scores are computable."""

    def forward(self, x):
        h = x.shape[2]
        bands = x.mean(1).reshape(len(x), 2, h // 2, -1).mean((2, 3))  # (B, 2): top half, bottom half
        return bands * 4


def rded(candidates: int, crops: int, factor: int, **kwargs) -> InitParams:
    """The ``init`` params of an RDED draw (the observers' names are the stage's business)."""
    return InitParams(method="rded", observers=["o"], candidates=candidates, crops=crops, factor=factor, **kwargs)


def data(n_per_class=6, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(2).repeat_interleave(n_per_class)
    x = torch.rand(len(y), 1, size, size, generator=g)
    return x, y


@pytest.mark.parametrize("factor,scale_min", [(1, 1.0), (2, 1.0), (2, 0.4)])
def test_rded_tiles_trace_back_to_their_source_crops_and_are_the_best(factor, scale_min):
    """Each tile is its source crop (the whole image at scale_min 1) resized to full size, then
    downsampled to a 1/factor tile, as RDED stitches: factor^2 whole objects per image."""
    x, y = data()
    obs = [Brightness()]
    ipc, cands, crops = 1, 4, 3
    res = rded_init(x, y, obs, rded(cands, crops, factor, batch_size=5, scale_min=scale_min), k=2, ipc=ipc,
                    gen=torch.Generator().manual_seed(1))
    assert res.images.shape == (2 * ipc, 1, 8, 8) and res.labels.tolist() == [0, 1]
    side = 8 // factor
    for img, rec in zip(res.images, res.index):
        assert len(rec["sources"]) == len(rec["boxes"]) == len(rec["scores"]) == factor * factor
        assert rec["scores"] == sorted(rec["scores"])  # tiles in rank order, best first
        for t, (src, (top, left, h, w), score) in enumerate(zip(rec["sources"], rec["boxes"], rec["scores"])):
            assert y[src] == rec["class"]
            area = h * w / 64
            assert (h, w) == (8, 8) if scale_min == 1 else scale_min * 0.7 <= area <= 1.0
            box = [torch.tensor([v]) for v in (top, left, h, w)]
            crop = crop_resize(x[src][None], *box)  # the box resized to full size (tests/test_plan.py)
            tile = F.interpolate(crop, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
            r, c = divmod(t, factor)
            torch.testing.assert_close(img[:, r * side:(r + 1) * side, c * side:(c + 1) * side], tile[0],
                                       atol=1e-5, rtol=0)
            # the stored score is the cross-entropy of the observers on the crop resized to full size
            logits = obs[0](crop)
            assert score == pytest.approx(float(F.cross_entropy(logits, torch.tensor([rec["class"]]))), abs=1e-5)


def test_crop_boxes_follow_random_resized_crop():
    from edc.init import crop_boxes

    b = crop_boxes(4000, 28, 28, 0.25, torch.Generator().manual_seed(0))
    top, left, h, w = b.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28).all() and (left + w <= 28).all()
    area = (h * w).double() / 784
    assert 0.2 <= float(area.min()) and float(area.max()) <= 1.0 and abs(float(area.mean()) - 0.625) < 0.03
    ratio = (w / h).double()
    assert 0.6 <= float(ratio.min()) and float(ratio.max()) <= 1.6
    assert torch.equal(crop_boxes(3, 28, 28, 1.0, torch.Generator()), torch.tensor([[0, 0, 28, 28]] * 3))


def test_rded_keeps_the_most_confident_images_with_factor_one():
    x, y = data(n_per_class=10)
    res = rded_init(x, y, [Brightness()], rded(10, 1, 1), k=2, ipc=2, gen=torch.Generator().manual_seed(0))
    scores = F.cross_entropy(Brightness()(x), y, reduction="none")
    for c in range(2):
        idx = torch.nonzero(y == c).flatten()
        best = idx[scores[idx].argsort()[:2]].tolist()
        chosen = [s for r in res.index if r["class"] == c for s in r["sources"]]
        assert chosen == best


def test_rded_is_seeded_and_checks_it_has_enough_candidates():
    x, y = data()
    a = rded_init(x, y, [Brightness()], rded(4, 3, 2), k=2, ipc=1, gen=torch.Generator().manual_seed(7))
    b = rded_init(x, y, [Brightness()], rded(4, 3, 2), k=2, ipc=1, gen=torch.Generator().manual_seed(7))
    assert torch.equal(a.images, b.images) and a.index == b.index
    with pytest.raises(DataError, match=r"init.candidates: 3 candidates cannot fill ipc\*factor\^2 = 4"):
        rded_init(x, y, [Brightness()], rded(3, 3, 2), k=2, ipc=1, gen=torch.Generator())
    with pytest.raises(DataError, match="init.candidates: class 0 has 6 train images, 8 are needed"):
        rded_init(x, y, [Brightness()], rded(8, 1, 2), k=2, ipc=2, gen=torch.Generator())


def test_stitching_trims_when_the_factor_does_not_divide_the_side():
    x, y = data(n_per_class=9, size=8)
    res = rded_init(x, y, [Brightness()], rded(9, 2, 3), k=2, ipc=1, gen=torch.Generator().manual_seed(0))
    assert res.images.shape[2:] == (8, 8)  # 3 x 3 tiles of 3 px, trimmed to 8
    src = res.index[0]["sources"][8]
    tile = F.interpolate(x[src][None], size=(3, 3), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(res.images[0, :, 6:8, 6:8], tile[0, :, :2, :2], atol=1e-6, rtol=0)


def test_real_and_noise():
    x, y = data()
    res = real_init(x, y, 2, 3, torch.Generator().manual_seed(0))
    assert res.labels.tolist() == [0, 0, 0, 1, 1, 1]
    for img, rec in zip(res.images, res.index):
        assert torch.equal(img, x[rec["sources"][0]]) and y[rec["sources"][0]] == rec["class"]
    assert len({r["sources"][0] for r in res.index}) == 6
    res = noise_init((1, 8, 8), 2, 3, torch.Generator().manual_seed(0))
    assert res.images.shape == (6, 1, 8, 8) and res.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert abs(float(res.images.std()) - 1) < 0.2


class Scaled(nn.Module):
    def __init__(self, inner: nn.Module, scale: float, shift: float):
        super().__init__()
        self.inner, self.scale, self.shift = inner, scale, shift

    def forward(self, x):
        out = self.inner(x) * self.scale
        return out + torch.tensor([self.shift, 0.0])


def test_rded_scores_are_the_cross_entropy_of_the_observers_mean_logits():
    """With two observers the score is CE(mean of their logits), not the mean of their CEs or of
    their probabilities (computed here by hand on the crops resized to full size)."""
    from edc.init import crop_scores

    x, y = data()
    crops = x[:, :, :4, :4]
    obs = [Scaled(Brightness(), 1.0, 0.0), Scaled(Brightness(), -3.0, 2.0)]
    got = crop_scores(crops, y, obs, (8, 8), batch_size=5)
    up = F.interpolate(crops, size=(8, 8), mode="bilinear", align_corners=False)
    mean_logits = (obs[0](up) + obs[1](up)) / 2
    want = F.cross_entropy(mean_logits, y, reduction="none")
    torch.testing.assert_close(got, want)
    mean_of_ce = sum(F.cross_entropy(o(up), y, reduction="none") for o in obs) / 2
    assert not torch.allclose(got, mean_of_ce)
