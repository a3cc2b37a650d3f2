"""Post-evaluation: schedules against their formulas, losses, and students trained from shards."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from edc.evaluate import Recipe, ema_decay, recompute_bn, student_loss, summarize, train_student
from edc.params import parse_params
from edc.schedules import cosine, lr_lambda, multistep, smoothing, ssrs
from edc.shards import load_condensed
from tests.helpers import FACTS, tiny_params, toy_images, write_set


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
    val = (torch.randn(6, 3, 10, 10), torch.arange(6) % 4)
    a = train_student(spec, Recipe(cfg, 2.0), ds, test, seed=3, val=val)
    b = train_student(spec, Recipe(cfg, 2.0), ds, test, seed=3, val=val)
    assert a.acc == b.acc and a.curve == b.curve
    # The curve scores the validation split only; the test split is scored once, after the last epoch.
    assert [r["epoch"] for r in a.curve] == [1, 2, 3, 4] and [("val_acc" in r) for r in a.curve] == [0, 1, 0, 1]
    assert not any(k.startswith("test") or "_test" in k for r in a.curve for k in r)
    assert a.val_acc == a.curve[-1]["val_acc"] and 0 <= a.acc <= 1
    assert ds.facts == FACTS


def test_ema_decay_warms_up_to_the_rate():
    assert ema_decay(0.99, 10, 0) == pytest.approx(1 / 10)
    assert ema_decay(0.99, 10, 5) == pytest.approx(6 / 15)
    assert ema_decay(0.99, 10, 890) == pytest.approx(891 / 900)
    assert ema_decay(0.99, 10, 891) == 0.99 and ema_decay(0.99, 10, 10_000) == 0.99
    assert ema_decay(0.99, 0, 0) == 0.99  # no warm-up


def bn_student_run(tmp_path, warmup, rate=0.9, epochs=6, eval_every=100):
    """A BatchNorm student trained on a plan of one batch per epoch; the raw weights and the EMA state
    after every epoch (= every optimiser step), from the resumable snapshots train_student hands out."""
    write_set(tmp_path / "s", epochs=epochs, batch_size=16, images=toy_images(n=16))
    ds = load_condensed(tmp_path / "s")
    raw = tiny_params()
    raw["evaluate"].update(ema_rate=rate, ema_warmup=warmup, eval_every=eval_every,
                           students=[{"name": "bn", "arch": "convnet", "kwargs": {"width": 8, "depth": 2,
                                                                                  "norm": "batch"}}])
    cfg = parse_params(raw).evaluate
    states = []
    test = (torch.randn(8, 3, 10, 10), torch.arange(8) % 4)
    res = train_student(cfg.students[0], Recipe(cfg, 2.0), ds, test, seed=0,  # the curve's points score val
                        on_epoch=lambda snap: states.append(copy.deepcopy(snap())), val=test)
    return ds, states, res


@pytest.mark.parametrize("warmup", [0, 10])
def test_post_evaluation_ema_follows_the_rate_and_warm_up_and_does_not_average_buffers(tmp_path, warmup):
    ds, states, _ = bn_student_run(tmp_path, warmup)
    name = "features.0.weight"
    raw = [s["model"][name] for s in states]
    ema = raw[0].clone()  # AveragedModel copies the weights at its first update
    for n, w in enumerate(raw[1:], start=1):
        d = ema_decay(0.9, warmup, n)
        ema = d * ema + (1 - d) * w
        torch.testing.assert_close(states[n]["ema"][f"module.{name}"], ema, rtol=1e-5, atol=1e-7)
    # BatchNorm buffers are not averaged (AveragedModel(use_buffers=False) keeps them equal to the raw
    # model's) until an evaluation, here only after the last epoch, recomputes them
    for key in [k for k in states[-2]["ema"] if k.endswith(("running_mean", "running_var"))]:
        torch.testing.assert_close(states[-2]["ema"][key], states[-2]["model"][key[len("module."):]], rtol=0, atol=0)


def test_ema_batchnorm_statistics_are_recomputed_from_the_planned_batches(tmp_path):
    ds, states, res = bn_student_run(tmp_path / "a", warmup=10, eval_every=3)
    # evaluated at epochs 3 and 6: the snapshot after epoch 6 holds the statistics the test used
    ema_state = states[-1]["ema"]
    first_bn = [k for k in ema_state if k.endswith("running_mean")][0]
    from edc.models import build

    model = build("convnet", {"width": 8, "depth": 2, "norm": "batch"}, ds.facts)
    model.load_state_dict({k[len("module."):]: v for k, v in ema_state.items() if k.startswith("module.")})
    # brute force: the first BatchNorm's input on the batches of the last epochs (10 batches at most)
    feats = []
    model.eval()
    first_conv = model.features[0]
    for e in range(max(0, ds.epochs - 10), ds.epochs):
        for x, _, _ in ds.epoch(e):
            with torch.no_grad():
                feats.append(first_conv(x))
    a = torch.cat(feats)
    torch.testing.assert_close(ema_state[first_bn], a.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert res.acc == res.acc  # a number, not NaN
    # recompute_bn itself, on a fresh copy: the same statistics, whatever the buffers held before
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(7.0)
    assert recompute_bn(model, ds, torch.device("cpu")) == ds.epochs  # one batch per epoch, all six epochs
    torch.testing.assert_close(model.state_dict()[first_bn[len("module."):]], a.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_variants_retrain_the_same_seeds_on_hard_labels_and_on_the_unaugmented_images(tmp_path):
    from edc.distributed import World
    from edc.evaluate import UnaugmentedView, evaluate_students, variant_sets
    from edc.resume import Checkpointer
    from edc.shards import read_epoch
    from edc.tracking import NullRun

    write_set(tmp_path / "s", epochs=2, images=toy_images(n=16), cutmix=True)
    ds = load_condensed(tmp_path / "s")
    # brute force: each image's mean stored logits over every planned view (CutMix views count for the
    # image whose id the batch holds)
    views = [(int(i), torch.from_numpy(row)) for e in range(ds.epochs) for b in read_epoch(ds.path, ds.meta, e)
             for i, row in zip(b["ids"], b["logits"])]
    mean = torch.stack([torch.stack([v for i, v in views if i == n]).mean(0) for n in range(16)])
    view = UnaugmentedView(ds)
    for e in range(ds.epochs):
        for (x, target, hard), b in zip(view.epoch(e), read_epoch(ds.path, ds.meta, e), strict=True):
            ids = torch.from_numpy(b["ids"])  # the planned batches, in order: the same steps as the main run
            assert torch.equal(x, ds.images[ids]) and torch.equal(hard, ds.hard[ids])
            torch.testing.assert_close(target, mean[ids])
    raw = tiny_params()
    raw["evaluate"]["variants"] = ["hard", "noaug"]
    cfg = parse_params(raw).evaluate
    test = (torch.randn(8, 3, 10, 10), torch.arange(8) % 4)
    metrics, curves = evaluate_students(Recipe(cfg, 2.0, torch.device("cpu"), False, World()), ds, test, None,
                                        seed_for=lambda *k: 5, ckpt=Checkpointer(tmp_path / "m.json", "x"),
                                        run=NullRun(), variants=variant_sets(ds, cfg.variants))
    got = metrics["student"]
    assert set(got["variants"]) == {"hard", "noaug"} and set(curves) == {
        "student-seed0", "student-hard-seed0", "student-noaug-seed0"}
    spec = cfg.students[0]
    assert got["acc_mean"] == pytest.approx(train_student(spec, Recipe(cfg, 2.0), ds, test, seed=5).acc, abs=1e-6)
    hard = train_student(spec, Recipe(cfg, 2.0), load_condensed(tmp_path / "s", labels="hard"), test, seed=5)
    assert got["variants"]["hard"]["acc_mean"] == pytest.approx(hard.acc, abs=1e-6)
    noaug = train_student(spec, Recipe(cfg, 2.0), view, test, seed=5)
    assert got["variants"]["noaug"]["acc_mean"] == pytest.approx(noaug.acc, abs=1e-6)
    # under evaluate.labels: hard the main evaluation is the hard-label one: no second copy of it
    assert set(variant_sets(load_condensed(tmp_path / "s", labels="hard"), ["hard", "noaug"])) == {"noaug"}
