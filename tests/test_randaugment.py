"""RandAugment in the stored plan: the teachers label the view the student later replays, pixel for pixel."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from edc.data import DatasetFacts, normalize
from edc.params import RelabelParams
from edc.plan import augment, batches, make_plan
from edc.randaugment import OPS, apply_ops, sample_ops
from edc.relabel import epoch_plan_logits, teacher_logits
from edc.shards import CondensedWriter, load_condensed

FACTS = DatasetFacts(name="toy", channels=3, height=12, width=12, num_classes=3, class_names=list("abc"),
                     mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3], counts={"train": [4] * 3, "test": [1] * 3})
PIXELS = (FACTS.mean, FACTS.std)


def toy(n=9):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 12, 12), generator=g, dtype=torch.uint8), torch.arange(n) % 3


def teachers():
    torch.manual_seed(0)
    return [nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))]


def relabel_cfg(randaugment: int) -> RelabelParams:
    return RelabelParams(teachers=["t"], epochs=1, batch_size=4, cutmix=False,
                         aug={"scale_min": 0.5, "flip": True, "randaugment": randaugment, "magnitude": 9})


def test_a_stored_randaugment_view_replays_to_the_pixels_the_teachers_labelled(tmp_path):
    from edc.shards import read_epoch, read_meta

    u8, y = toy()
    x = normalize(u8, FACTS)
    cfg = relabel_cfg(2)
    meta = {"dataset": FACTS.to_dict(), "class_names": FACTS.class_names, "num_classes": 3, "ipc": 3,
            "teachers": ["t"], "epochs": 2, "batch_size": 4, "topk": 0, "cutmix": False,
            "aug": {"scale_min": 0.5, "flip": True, "randaugment": 2, "magnitude": 9}, "params": {}}
    (tmp_path / "set").mkdir()
    w = CondensedWriter(tmp_path / "set", u8, y, meta)
    plans = []
    for e in range(2):
        plan, logits, _ = epoch_plan_logits(x, y, teachers(), cfg, 3, e, pixels=PIXELS)
        assert plan.crops.shape == (9, 5 + 2 * 2)  # the operations are part of the plan
        w.write_epoch(e, plan, 4, logits, 0)
        plans.append(plan)
    w.close()
    ds = load_condensed(tmp_path / "set")
    for e, plan in enumerate(plans):
        # the views the teachers labelled, as the relabel stage makes them
        labelled = torch.cat([augment(x[ids], crops, mix, PIXELS) for ids, crops, mix in batches(plan, 4)])
        got = list(ds.epoch(e))
        replayed = torch.cat([b[0] for b in got])
        assert torch.equal(replayed, labelled)  # pixel for pixel
        stored = torch.cat([torch.from_numpy(b["crops"]) for b in read_epoch(tmp_path / "set",
                                                                              read_meta(tmp_path / "set"), e)])
        assert torch.equal(stored, plan.crops)  # operations and magnitudes come back from the shard
        torch.testing.assert_close(torch.cat([b[1] for b in got]), teacher_logits(teachers(), replayed).half().float(),
                                   rtol=0, atol=0)
    # the operations change the views: the same crops without them are other pixels
    ids, crops, _ = next(batches(plans[0], 4))
    assert not torch.allclose(augment(x[ids], crops, None, PIXELS), augment(x[ids], crops[:, :5], None), atol=1e-3)


def test_operations_use_torchvisions_randaugment_magnitudes():
    """Bin 9 of 0-30 (torchvision's default): rotate 9 degrees, brightness 1 - 0.27, posterize
    8 - round(9 / 7.5) = 7 bits, solarize at 255 * (1 - 0.3), translate 150/331 * 0.3 of the width,
    shear atan(0.3 * 0.3)."""
    u8, _ = toy(2)
    x = normalize(u8, FACTS)
    nearest = InterpolationMode.NEAREST
    want = {
        ("rotate", 9): lambda im: TF.rotate(im, 9.0, interpolation=nearest, fill=0),
        ("brightness", -9): lambda im: TF.adjust_brightness(im, 1 - 0.27),
        ("posterize", 9): lambda im: TF.posterize(im, 7),
        ("solarize", 9): lambda im: TF.solarize(im, 255 * 0.7),
        ("translate_x", -9): lambda im: TF.affine(im, angle=0.0, translate=[int(-150 / 331 * 12 * 0.3), 0], scale=1.0,
                                                  shear=[0.0, 0.0], interpolation=nearest, fill=0),
        ("shear_y", 9): lambda im: TF.affine(im, angle=0.0, translate=[0, 0], scale=1.0,
                                             shear=[0.0, math.degrees(math.atan(0.09))], interpolation=nearest,
                                             fill=0, center=[0, 0]),
    }
    for (op, m), ref in want.items():
        cols = torch.tensor([[OPS.index(op), m]] * 2)
        got = apply_ops(x, cols, *PIXELS)
        expect = normalize(torch.stack([ref(im) for im in u8]), FACTS)
        torch.testing.assert_close(got, expect, rtol=0, atol=1e-5, msg=op)
        assert not torch.allclose(got, x, atol=1e-3), op


def test_plans_without_randaugment_are_unchanged_and_draws_come_last():
    base = make_plan(9, 12, 12, 4, 0.5, True, cutmix=True, gen=torch.Generator().manual_seed(1))
    with_ops = make_plan(9, 12, 12, 4, 0.5, True, cutmix=True, gen=torch.Generator().manual_seed(1), randaugment=3)
    assert base.crops.shape == (9, 5) and torch.equal(with_ops.crops[:, :5], base.crops)
    assert torch.equal(with_ops.order, base.order) and torch.equal(with_ops.mix, base.mix)
    ops = sample_ops(500, 2, 9, torch.Generator().manual_seed(0))
    assert set(ops[:, 0].tolist()) == set(range(len(OPS))) and set(ops[:, 1].abs().tolist()) == {9}
    with pytest.raises(ValueError, match="pass pixels"):
        augment(normalize(toy()[0], FACTS)[:2], with_ops.crops[:2], None)
