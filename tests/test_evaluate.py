"""Post-evaluation: schedules against their formulas, losses, and students trained from shards."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from edc.evaluate import student_loss, summarize, train_student
from edc.params import parse_params
from edc.schedules import cosine, lr_lambda, multistep, smoothing, ssrs
from edc.shards import load_condensed
from tests.conftest import tiny_params
from tests.test_shards import FACTS, toy_images, write_set


def test_smoothing_schedule_formula():
    n = 120
    f = smoothing(n, zeta=2.0)
    for i in (0, 10, 60, 119, 120):
        assert f(i) == pytest.approx((1 + math.cos(i * math.pi / (2.0 * n))) / 2)
    assert f(n) == pytest.approx(0.5)  # zeta = 2 ends at half the learning rate
    assert all(smoothing(n, 1.0)(i) == pytest.approx(cosine(n)(i)) for i in range(n + 1))  # zeta = 1 is cosine


def test_ssrs_follows_eq_33():
    n, zeta = 60, 2.0
    f = ssrs(n, zeta)
    knee = (1 + math.cos(5 * math.pi / (6 * zeta))) / 2
    assert f(50) == pytest.approx((1 + math.cos(50 * math.pi / (zeta * n))) / 2)  # i <= 5N/6
    assert f(51) == pytest.approx(knee * (6 * n - 6 * 51) / (6 * n))
    assert f(n) == 0.0


def test_multistep_and_dispatch():
    f = multistep(100, [0.8, 0.9], 0.5)
    assert [f(i) for i in (0, 79, 80, 89, 90, 99)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    assert lr_lambda("smoothing", 10, zeta=3.0)(10) == pytest.approx(smoothing(10, 3.0)(10))
    with pytest.raises(ValueError):
        lr_lambda("nope", 10)


def test_losses():
    g = torch.Generator().manual_seed(0)
    out, teacher, hard = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), torch.tensor([0, 1, 2, 3, 0])
    t = 4.0
    p, log_q = F.softmax(teacher / t, 1), F.log_softmax(out / t, 1)
    want = (p * (p.log() - log_q)).sum(1).mean() * t * t
    torch.testing.assert_close(student_loss("kl", out, teacher, hard, t, soft=True), want)
    assert float(student_loss("kl", teacher, teacher, hard, t, soft=True)) == pytest.approx(0, abs=1e-6)
    torch.testing.assert_close(student_loss("mse_ce", out, teacher, hard, t, soft=True),
                               F.mse_loss(out, teacher) + 0.025 * F.cross_entropy(out, hard))
    torch.testing.assert_close(student_loss("kl", out, hard, hard, t, soft=False), F.cross_entropy(out, hard))
    assert summarize([0.5]) == (0.5, 0.0)
    assert summarize([0.5, 0.7])[1] == pytest.approx(0.1414213, rel=1e-5)


def test_student_trains_from_shards_alone_and_is_seeded(tmp_path):
    write_set(tmp_path / "s", epochs=4, images=toy_images(n=16))
    ds = load_condensed(tmp_path / "s")
    raw = tiny_params()
    raw["evaluate"]["eval_every"] = 2
    cfg = parse_params(raw).evaluate
    test = (torch.randn(8, 3, 10, 10), torch.arange(8) % 4)
    spec = cfg.students[0]
    a = train_student(spec, cfg, 2.0, ds, test, seed=3)
    b = train_student(spec, cfg, 2.0, ds, test, seed=3)
    assert a.acc == b.acc and a.curve == b.curve
    assert [r["epoch"] for r in a.curve] == [1, 2, 3, 4] and [("test_acc" in r) for r in a.curve] == [0, 1, 0, 1]
    assert ds.facts == FACTS
