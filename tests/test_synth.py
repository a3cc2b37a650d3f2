"""EDC synthesis against its formulas (paper Eqs. 5-7), by brute force on hand-sized cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edc import synth_reference as reference
from edc.errors import EdcError
from edc.params import SynthAugParams, parse_params
from edc.stats import bn_layers, collect_bn_stats
from edc.synth import (
    LayerTargets,
    Observer,
    Target,
    batch_moments,
    channel_affine,
    ema_update,
    flatness_kl,
    fused_matching,
    image_moments,
    matching_loss,
    matching_report,
    partition,
    synthesize,
)
from edc.synth_views import Jitter, apply_crop_flip, apply_view, sample_crop_flip, sample_jitter, sample_view
from tests.helpers import tiny_params

K = 3


def tiny_observer_model(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    # in-place ReLU after a BatchNorm, as ResNet and MobileNet have: the taps must allow it
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                         nn.Conv2d(4, 5, 3, stride=2), nn.BatchNorm2d(5), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(5, K)).eval()


def real_like(n=30, seed=0):
    """Class-dependent images: class c is brighter in band c."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    x = torch.randn(n, 1, 9, 9, generator=g) * 0.5
    for c in range(K):
        x[y == c, :, 3 * c:3 * c + 3] += 1.5
    return x, y


def brute_force_moments(a: torch.Tensor, sel: torch.Tensor):
    return reference.moments(a.double(), sel)


def class_term(a, sel, t: Target, c: int):
    m, v = brute_force_moments(a, sel)
    return torch.linalg.norm(m - t.class_mean[c].double()) + torch.linalg.norm(v - t.class_var[c].double())


def random_target(c=4, k=K, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Target(torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5, torch.randn(k, c, generator=g),
                  torch.rand(k, c, generator=g) + 0.5)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_matching_loss_equals_the_reference(alpha):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 4, 5, 5, generator=g) * 2 + 1
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    t = random_target()
    want = reference.layer_matching(a.double(), y, t, alpha)
    torch.testing.assert_close(matching_loss(a, y, t, alpha).double(), want, rtol=1e-5, atol=1e-5)


def test_alpha_one_is_global_only_and_alpha_zero_is_per_class_only():
    a, y, t = torch.randn(6, 4, 3, 3), torch.tensor([0, 0, 1, 1, 2, 2]), random_target()
    other = Target(t.mean, t.var, t.class_mean + 5, t.class_var * 3)  # only per-class targets differ
    assert torch.equal(matching_loss(a, y, t, 1.0), matching_loss(a, y, other, 1.0))
    assert not torch.allclose(matching_loss(a, y, t, 0.0), matching_loss(a, y, other, 0.0))
    shifted = Target(t.mean + 5, t.var * 3, t.class_mean, t.class_var)  # only global targets differ
    # (equal up to rounding: the global target mean is also the numerical shift of the moments)
    torch.testing.assert_close(matching_loss(a, y, t, 0.0), matching_loss(a, y, shifted, 0.0), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(matching_loss(a, y, t, 1.0), matching_loss(a, y, shifted, 1.0))


def test_within_class_variance_is_the_mean_of_the_images_own_variances():
    """``class_var="within"``: per class, |mean of each image's spatial variance - target| replaces
    the pooled variance's term (brute force below); with one image per class the two coincide on the
    batch's side, so only the target differs."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(7, 4, 3, 3, generator=g) * 2 + 1
    y = torch.tensor([0, 0, 0, 1, 1, 2, 0])
    t = random_target()
    t = Target(t.mean, t.var, t.class_mean, t.class_var, torch.rand(K, 4, generator=g) + 0.2)
    shares = y.double().new_tensor([float((y == c).double().mean()) for c in range(3)])
    want = torch.zeros((), dtype=torch.float64)
    for c in range(3):
        imgs = a[y == c].double()
        mean = imgs.transpose(0, 1).reshape(4, -1).mean(1)
        own = imgs.reshape(len(imgs), 4, -1).var(2, unbiased=False).mean(0)
        want += shares[c] * (torch.linalg.norm(mean - t.class_mean[c].double())
                             + torch.linalg.norm(own - t.class_within_var[c].double()))
    got = fused_matching([image_moments(a, t.mean)], y, LayerTargets([t]), 0.0, class_var="within")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference.layer_matching(a.double(), y, t, 0.0, "within"), want, rtol=1e-12, atol=0)
    assert not torch.allclose(got, fused_matching([image_moments(a, t.mean)], y, LayerTargets([t]), 0.0))
    one = torch.tensor([0, 1, 2])
    pooled_target = Target(t.mean, t.var, t.class_mean, t.class_within_var, t.class_within_var)
    torch.testing.assert_close(
        fused_matching([image_moments(a[:3], t.mean)], one, LayerTargets([t]), 0.0, class_var="within"),
        fused_matching([image_moments(a[:3], t.mean)], one, LayerTargets([pooled_target]), 0.0))
    no_within = LayerTargets([Target(t.mean, t.var, t.class_mean, t.class_var)])
    with pytest.raises(EdcError, match="synth.class_var: within needs statistics with class_within_var"):
        fused_matching([image_moments(a, t.mean)], y, no_within, 0.0, class_var="within")


def test_class_share_weights_unbalanced_batches_and_absent_classes_count_zero():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(8, 4, 3, 3, generator=g)
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])  # p = 5/8, 3/8, class 2 absent
    t = random_target()
    per_class = [class_term(a, y == c, t, c) for c in (0, 1)]
    want = 5 / 8 * per_class[0] + 3 / 8 * per_class[1]
    torch.testing.assert_close(matching_loss(a, y, t, 0.0).double(), want, rtol=1e-5, atol=1e-6)
    moved = Target(t.mean, t.var, t.class_mean.clone(), t.class_var.clone())
    moved.class_mean[2] += 100
    assert torch.equal(matching_loss(a, y, t, 0.0), matching_loss(a, y, moved, 0.0))


@pytest.mark.parametrize("offset,shifted", [(0.0, False), (300.0, True)])
def test_batch_moments_are_population_moments(offset, shifted):
    """Against a float64 brute force; with channel means 300x the spread, the shift keeps it exact."""
    a = torch.randn(7, 3, 4, 4) + offset * torch.tensor([1.0, -2.0, 0.5])[None, :, None, None]
    y = torch.tensor([0, 1, 1, 2, 2, 2, 0])
    shift = a.double().mean((0, 2, 3)).float() + 0.3 if shifted else None
    got = batch_moments(a, F.one_hot(y, K).float(), shift)
    m, v = brute_force_moments(a, torch.ones(7, dtype=torch.bool))
    torch.testing.assert_close(got.mean.double(), m, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.var.double(), v, rtol=1e-4, atol=1e-4)
    for c in range(K):
        m, v = brute_force_moments(a, y == c)
        torch.testing.assert_close(got.class_mean[c].double(), m, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got.class_var[c].double(), v, rtol=1e-4, atol=1e-4)


def observer_with_stats(x, y, seed=0) -> Observer:
    model = tiny_observer_model(seed)
    return Observer("tiny", model, collect_bn_stats(model, x, y, K, batch_size=7))


def test_matching_loss_is_zero_when_the_batch_is_the_data_the_targets_came_from():
    x, y = real_like()
    obs = observer_with_stats(x, y)
    _, inputs = obs.forward(x)
    for alpha in (0.0, 0.5, 1.0):
        assert float(obs.matching(inputs, y, alpha)) < 1e-4


@pytest.mark.parametrize("alpha, layers, class_var, first_layer_weight", [
    (0.0, "sum", "pooled", 1.0), (0.3, "sum", "pooled", 1.0), (1.0, "sum", "pooled", 1.0),
    (0.3, "mean", "within", 10.0)])
def test_the_fused_loss_and_its_gradient_equal_the_plain_reference(alpha, layers, class_var, first_layer_weight):
    """The observer's fused BatchNorm-with-moments layers and its all-layers-at-once matching give the
    plain model's logits, and edc.synth_reference's loss on the model's own BatchNorm inputs (autograd
    through the formulas as written), value and gradient to the pixels, in float64. The targets are
    moved off the data so that no term is zero."""
    x, y = real_like()
    x = x.double()
    plain = tiny_observer_model(1).double()
    stats = collect_bn_stats(plain, x, y, K, batch_size=7)
    for s in stats.values():
        s.class_mean += 0.1 * torch.randn_like(s.class_mean)
        s.var *= 1.5
        s.class_within_var *= 1.2
    obs = Observer("tiny", tiny_observer_model(1).double(), stats, layers=layers, class_var=class_var,
                   first_layer_weight=first_layer_weight)
    # float64 targets for a tight check (Observer keeps float32 ones; the shift may be anything)
    obs.targets = [Target(*(v.double() for v in (t.mean, t.var, t.class_mean, t.class_var, t.class_within_var)))
                   for t in obs.targets]
    obs.fused = LayerTargets(obs.targets)
    xa = x[:12].clone().requires_grad_(True)
    xb = x[:12].clone().requires_grad_(True)
    logits_ref, inputs = reference.bn_inputs(plain, xa)
    ref = reference.matching(inputs, y[:12], obs.targets, alpha, layers=layers, class_var=class_var,
                             layer_weights=[first_layer_weight, 1.0])
    logits, moments = obs.forward(xb)
    got = obs.matching(moments, y[:12], alpha)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)
    (g_ref,) = torch.autograd.grad(ref + logits_ref.square().sum(), xa)
    (g_got,) = torch.autograd.grad(got + logits.square().sum(), xb)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-8, atol=1e-10)
    # Outside Observer.forward the layers are the model's own BatchNorm again.
    torch.testing.assert_close(obs.model(x[:5]), plain(x[:5]), rtol=0, atol=0)


def test_channel_affine_is_a_per_channel_and_a_per_row_scale_and_shift():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    w, b = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(channel_affine(x, w, b), x * w[:, None, None] + b[:, None, None], rtol=1e-15, atol=1e-15)
    rows = x.reshape(1, 12, 25)
    w12, b12 = torch.randn(12, generator=g, dtype=torch.float64), torch.randn(12, generator=g, dtype=torch.float64)
    torch.testing.assert_close(channel_affine(rows, w12, b12), rows * w12[:, None] + b12[:, None], rtol=1e-15,
                               atol=1e-15)
    torch.testing.assert_close(channel_affine(x, w, None), x * w[:, None, None], rtol=1e-15, atol=1e-15)


def test_observer_logits_fold_batchnorm_and_equal_the_model():
    """The flatness term's EMA forward (Observer.logits) runs the model with each BatchNorm folded into
    the convolution before it: no BatchNorm is left, the logits equal the model's, no gradient."""
    model = tiny_observer_model(2).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, bn in bn_layers(model):  # statistics and affine parameters far from the identity
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g, dtype=torch.float64))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g, dtype=torch.float64) + 0.5)
            bn.weight.copy_(torch.randn(bn.num_features, generator=g, dtype=torch.float64))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g, dtype=torch.float64))
    x, y = real_like()
    obs = Observer("tiny", model, collect_bn_stats(model, x.double(), y, K, batch_size=7))
    assert not bn_layers(obs._folded)  # edc.models.inference.inference_copy
    xr = x[:6].double().requires_grad_(True)
    got = obs.logits(xr)
    assert not got.requires_grad
    torch.testing.assert_close(got, obs.model(x[:6].double()), rtol=1e-12, atol=1e-12)
    logits, _ = obs.forward(x[:6].double())
    torch.testing.assert_close(got, logits, rtol=1e-12, atol=1e-12)


def test_ema_update():
    x_ema, x = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    ema_update(x_ema, x, beta=0.75)
    torch.testing.assert_close(x_ema, torch.tensor([0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * -2]))


def test_flatness_kl_formula_zero_at_equality_and_no_gradient_into_ema():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, generator=g, requires_grad=True)
    logits_ema = torch.randn(4, 5, generator=g, requires_grad=True)
    tau = 4.0
    p, q = F.softmax(logits / tau, 1), F.softmax(logits_ema / tau, 1)
    want = (p * (p.log() - q.log())).sum(1).mean()
    got = flatness_kl(logits, logits_ema, tau)
    torch.testing.assert_close(got, want)
    got.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert logits_ema.grad is None
    assert flatness_kl(logits, logits.detach().clone(), tau).item() == pytest.approx(0.0, abs=1e-7)


def test_crop_flip_identity_and_flip():
    x = torch.randn(3, 2, 6, 6)
    ones, zeros = torch.ones(3), torch.zeros(3)
    from edc.synth_views import CropFlip

    torch.testing.assert_close(apply_crop_flip(x, CropFlip(ones, ones, zeros, zeros, zeros.bool())), x)
    torch.testing.assert_close(apply_crop_flip(x, CropFlip(ones, ones, zeros, zeros, ones.bool())), x.flip(-1))
    t = sample_crop_flip(1000, 0.5, True, torch.Generator().manual_seed(0))
    area = t.scale_w * t.scale_h
    assert area.min() >= 0.5 * 0.74 and area.max() <= 1.0 and 0.4 < t.flip.float().mean() < 0.6
    assert ((t.center_x.abs() + t.scale_w) <= 1 + 1e-6).all()  # the crop stays inside the image


def test_partition_interleaves_classes():
    labels = torch.arange(3).repeat_interleave(4)  # 0000 1111 2222
    batches = partition(labels, 6)
    assert [labels[b].tolist() for b in batches] == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 1, 2]]
    assert len(partition(labels, None)) == 1


def synth_cfg(**over):
    raw = tiny_params()
    raw["synth"].update(over)
    return parse_params(raw).synth


def run_synth(seed=0, **over):
    x, y = real_like()
    obs = observer_with_stats(x, y)
    start = torch.randn(6, 1, 9, 9, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(K).repeat_interleave(2)
    rows = []
    out = synthesize(start, labels, [obs], synth_cfg(**over), 0.5, (torch.tensor(-4.0), torch.tensor(4.0)),
                     seed_for=lambda b: seed * 1000 + b, log=rows.append)
    return start, labels, obs, out, rows


def test_a_few_steps_lower_the_matching_loss():
    start, labels, obs, out, rows = run_synth(iterations=40, lr=0.1, aug={"scale_min": 1.0, "flip": False})
    batches = partition(labels, None)
    before = matching_report(start, labels, [obs], 0.5, batches)["tiny"]
    after = matching_report(out, labels, [obs], 0.5, batches)["tiny"]
    assert after < 0.6 * before, (before, after)
    assert len(rows) == 40 and {"ce", "bn", "flat", "total"} <= set(rows[0])
    assert out.min() >= -4 and out.max() <= 4  # clipped to the valid range


def test_flatness_is_zero_on_the_first_step_and_active_after():
    *_, rows = run_synth(iterations=5, flatness={"mode": "logits", "weight": 1.0, "beta": 0.9, "tau": 4.0})
    # the EMA logits come from the BatchNorm-folded copy of the observer: equal up to float32 rounding
    assert abs(rows[0]["flat"]) < 1e-7 and rows[-1]["flat"] > max(1e-6, 10 * abs(rows[0]["flat"]))
    *_, rows = run_synth(iterations=5, flatness={"mode": "stats", "weight": 1.0, "beta": 0.9, "tau": 4.0})
    assert rows[0]["flat"] < 1e-5 and rows[-1]["flat"] > 0
    *_, rows = run_synth(iterations=3, flatness={"mode": "off", "weight": 1.0, "beta": 0.9, "tau": 4.0})
    assert all(r["flat"] == 0.0 for r in rows)


def test_same_seed_same_bytes_other_seed_other_images():
    a = run_synth(seed=0, iterations=6)[3]
    b = run_synth(seed=0, iterations=6)[3]
    c = run_synth(seed=1, iterations=6)[3]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_zero_iterations_keep_the_initial_images():
    start, _, _, out, rows = run_synth(iterations=0)
    assert torch.equal(start, out) and rows == []


def test_round_robin_over_observers():
    x, y = real_like()
    observers = [observer_with_stats(x, y, seed=s) for s in (0, 1)]
    observers[1].name = "other"
    rows = []
    synthesize(torch.randn(6, 1, 9, 9), torch.arange(K).repeat_interleave(2), observers, synth_cfg(iterations=5),
               0.5, (torch.tensor(-4.0), torch.tensor(4.0)), seed_for=lambda b: b, log=rows.append)
    assert [r["observer"] for r in rows] == ["tiny", "other", "tiny", "other", "tiny"]
    assert bn_layers(observers[0].model)[0][1].training is False


def test_moments_gradient_matches_autograd_of_the_two_pass_formula():
    """The hand-written backward of the one-pass moments equals autograd through the textbook
    two-pass formula (float64, gradcheck-style comparison)."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 1, 2, 2, 0])
    oh = F.one_hot(y, K).double()
    w = torch.randn(4, K, 3, generator=g, dtype=torch.float64)

    def two_pass(x):
        flat = x.reshape(6, 3, -1)
        mean = flat.mean((0, 2))
        var = (flat - mean[None, :, None]).square().mean((0, 2))
        cm = oh.T @ flat.mean(2) / oh.sum(0)[:, None]
        cv = oh.T @ (flat - (oh @ cm)[:, :, None]).square().mean(2) / oh.sum(0)[:, None]
        return (w[0, 0] * mean).sum() + (w[1, 0] * var).sum() + (w[2] * cm).sum() + (w[3] * cv).sum()

    def one_pass(x):
        t = batch_moments(x, oh, torch.full((3,), 0.7, dtype=torch.float64))
        return (w[0, 0] * t.mean).sum() + (w[1, 0] * t.var).sum() + (w[2] * t.class_mean).sum() + \
            (w[3] * t.class_var).sum()

    (want,) = torch.autograd.grad(two_pass(a), a)
    (got,) = torch.autograd.grad(one_pass(a), a)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert torch.autograd.gradcheck(lambda x: one_pass(x), (a,))


def reference_synthesis(start, labels, model, stats, cfg, alpha, seed, k=1):
    """The synthesis objective and its optimiser written out from the paper (Eqs. 5-7 and 16), independently
    of edc.synth's loop: Adam (betas 0.5, 0.9) by hand at lr * cosine, the loss
    ``ce_weight * CE + r_bn * matching + w_fr * KL``, with matching the mean over layers (Eq. 16) of
    edc.synth_reference's loss on a plain model's BatchNorm inputs, clipping to [-4, 4], then
    x_ema <- beta * x_ema + (1 - beta) * x. Returns the images and the flatness value of every step."""
    import math

    fr = cfg.flatness
    targets = [Target.from_stats(s, dtype=start.dtype) for s in stats.values()]
    gen = torch.Generator().manual_seed(seed)
    x, x_ema = start.clone(), start.clone()
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    b1, b2, eps, flats = 0.5, 0.9, 1e-8, []
    # each image k times, every copy its own crop; the losses see all k * N views at once
    for t in range(cfg.iterations):
        aug = sample_crop_flip(k * len(x), cfg.aug.scale_min, cfg.aug.flip, gen)
        with torch.no_grad():
            q = model(apply_crop_flip(torch.cat([x_ema] * k), aug))
        xg = x.clone().requires_grad_(True)
        logits, inputs = reference.bn_inputs(model, apply_crop_flip(torch.cat([xg] * k), aug))
        lk = torch.cat([labels] * k)
        match = reference.matching(inputs, lk, targets, alpha, layers="mean")
        p_log, q_log = F.log_softmax(logits / fr.tau, 1), F.log_softmax(q / fr.tau, 1)
        flat = (p_log.exp() * (p_log - q_log)).sum(1).mean()
        loss = cfg.ce_weight * F.cross_entropy(logits, lk) + cfg.r_bn * match + fr.weight * flat
        (g,) = torch.autograd.grad(loss, xg)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * t / cfg.iterations))
        x = (x - lr * (m / (1 - b1 ** (t + 1))) / ((v / (1 - b2 ** (t + 1))).sqrt() + eps)).clamp(-4.0, 4.0)
        x_ema = fr.beta * x_ema + (1 - fr.beta) * x
        flats.append(float(flat.detach()))
    return x, flats


@pytest.mark.parametrize("class_views, views", [(1, 1), (2, 1), (3, 2)])
def test_synthesis_steps_equal_the_reference_loop(class_views, views):
    """Pins, at their call sites, the image-EMA update (beta vs 1 - beta), Adam's betas and learning
    rate, the weights of the three terms (the flatness weight included), the layer mean and, with
    ``synth.class_views``, k crops of each image matched together (a class's moments over all its views):
    two images per class here, so 2 crops per class need one crop per image and 3 need two."""
    x, y = real_like()
    stats = collect_bn_stats(tiny_observer_model(0), x, y, K, batch_size=7)
    for s in stats.values():  # off the data, so that every term has a gradient
        s.class_mean += 0.3
    # float64: Adam's first steps are about lr * sign(gradient), so float32 rounding would flip the
    # step of pixels whose gradient is near zero
    start = torch.randn(6, 1, 9, 9, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    labels = torch.arange(K).repeat(2)  # already in partition's interleaved order: one batch, same rows
    cfg = synth_cfg(iterations=6, lr=0.3, r_bn=0.7, ce_weight=0.6, layers="mean", class_views=class_views,
                    flatness={"mode": "logits", "weight": 3.0, "beta": 0.6, "tau": 0.5},
                    aug={"scale_min": 0.5, "flip": True})
    rows = []
    obs = Observer("tiny", tiny_observer_model(0).double(), stats, layers=cfg.layers)
    got = synthesize(start, labels, [obs], cfg, 0.4, (torch.tensor(-4.0), torch.tensor(4.0)), seed_for=lambda b: 11,
                     log=rows.append)
    want, flats = reference_synthesis(start, labels, tiny_observer_model(0).double(), stats, cfg, 0.4, 11, views)
    assert flats[0] == 0.0 and min(flats[1:]) > 1e-6  # the flatness term is live after the first step
    torch.testing.assert_close([r["flat"] for r in rows], flats, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_layer_mean_is_the_sum_over_the_number_of_layers():
    x, y = real_like()
    stats = collect_bn_stats(tiny_observer_model(0), x, y, K, batch_size=7)
    for s in stats.values():
        s.var *= 2
    summed = Observer("tiny", tiny_observer_model(0), stats, layers="sum")
    mean = Observer("tiny", tiny_observer_model(0), stats, layers="mean")
    _, mom = summed.forward(x[:9])
    total = summed.matching(mom, y[:9], 0.5)
    assert float(total) > 0
    torch.testing.assert_close(mean.matching(mom, y[:9], 0.5), total / 2)  # two BatchNorm layers


def test_statistics_under_the_synthesis_augmentation_are_those_of_the_augmented_views():
    """collect_bn_stats(aug=...) equals the plain statistics of the views it draws (same generator)."""

    x, y = real_like(n=12)
    aug = SynthAugParams(scale_min=0.5, flip=True)
    model = tiny_observer_model(0)
    got = collect_bn_stats(model, x, y, K, batch_size=5, aug=aug, draws=2, seed=3)
    gen = torch.Generator().manual_seed(3)
    views, vy = [], []
    for i in range(0, 12, 5):
        for _ in range(2):
            views.append(apply_crop_flip(x[i:i + 5], sample_crop_flip(len(x[i:i + 5]), 0.5, True, gen)))
            vy.append(y[i:i + 5])
    want = collect_bn_stats(model, torch.cat(views), torch.cat(vy), K, batch_size=100)
    plain = collect_bn_stats(model, x, y, K, batch_size=5)
    for layer in want:
        torch.testing.assert_close(got[layer].class_mean, want[layer].class_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[layer].var, want[layer].var, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got[layer].var, plain[layer].var)


# --- SRe2L's recover: the jitter, the first layer's weight, the running statistics -------------------

def hand_rolled(x: torch.Tensor, dy: int, dx: int, flip: torch.Tensor) -> torch.Tensor:
    """out[b, :, i, j] = x[b, :, (i - dy) mod H, (j - dx) mod W], then mirrored where ``flip``: a roll by
    index arithmetic, without torch.roll."""
    h, w = x.shape[-2:]
    rows = (torch.arange(h) - dy) % h
    cols = (torch.arange(w) - dx) % w
    out = x[:, :, rows][:, :, :, cols]
    return torch.stack([o.flip(-1) if f else o for o, f in zip(out, flip)])


def test_jitter_is_one_roll_of_the_batch_by_at_most_jitter_pixels():
    x = torch.arange(2 * 1 * 5 * 7, dtype=torch.float32).reshape(2, 1, 5, 7)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        t = sample_jitter(len(x), 3, True, gen)
        seen.add((t.dy, t.dx))
        torch.testing.assert_close(apply_view(x, t), hand_rolled(x, t.dy, t.dx, t.flip), rtol=0, atol=0)
    shifts = {d for pair in seen for d in pair}
    assert shifts == set(range(-3, 4))  # every shift in [-3, 3] along each axis, nothing beyond
    assert apply_view(x, Jitter(0, 0, torch.zeros(2, dtype=torch.bool))).equal(x)


def test_views_keep_the_crops_draws_and_dispatch_on_kind():
    """kind crop draws exactly what sample_crop_flip draws (the default's bytes); kind jitter a roll."""

    crop = sample_view(6, SynthAugParams(kind="crop", scale_min=0.5, flip=True, jitter=4),
                       torch.Generator().manual_seed(1))
    want = sample_crop_flip(6, 0.5, True, torch.Generator().manual_seed(1))
    assert all(torch.equal(getattr(crop, f), getattr(want, f)) for f in ("scale_w", "center_x", "flip"))
    jit = sample_view(6, SynthAugParams(kind="jitter", scale_min=0.5, flip=False, jitter=2),
                      torch.Generator().manual_seed(1))
    assert isinstance(jit, Jitter) and max(abs(jit.dy), abs(jit.dx)) <= 2 and not jit.flip.any()


def test_synthesis_with_jitter_matches_rolled_views():
    """A synthesis step under kind jitter shows the observer the batch rolled by the drawn shift: its
    cross-entropy equals the model's on the hand-rolled images."""
    x, y = real_like()
    stats = collect_bn_stats(tiny_observer_model(0), x, y, K, batch_size=7)
    cfg = synth_cfg(iterations=1, lr=0.0001, r_bn=0.0, ce_weight=1.0, class_views=1, flatness={"mode": "off"},
                    aug={"kind": "jitter", "jitter": 4, "flip": False})
    rows = []
    start = x[:6].clone()
    synthesize(start, y[:6], [Observer("tiny", tiny_observer_model(0), stats)], cfg, 1.0,
               (torch.tensor(-9.0), torch.tensor(9.0)), seed_for=lambda b: 5, log=rows.append)
    t = sample_jitter(6, 4, False, torch.Generator().manual_seed(5))
    idx = partition(y[:6], None)[0]
    with torch.no_grad():
        want = F.cross_entropy(tiny_observer_model(0)(hand_rolled(start[idx], t.dy, t.dx, t.flip)), y[:6][idx])
    assert rows[0]["ce"] == pytest.approx(float(want), rel=1e-5)


def brute_force_layers(x, y, model, targets, alpha, weights):
    """sum_l w_l * Eq. 5 on the inputs of a plain model's BatchNorm layers (edc.synth_reference)."""
    return reference.matching(reference.bn_inputs(model, x)[1], y, targets, alpha, layer_weights=weights)


@pytest.mark.parametrize("layers", ["sum", "mean"])
def test_first_layer_weight_multiplies_the_first_layers_term(layers):
    x, y = real_like()
    stats = collect_bn_stats(tiny_observer_model(0), x, y, K, batch_size=7)
    for s in stats.values():  # off the data, so that both layers' terms are non-zero
        s.var *= 2
        s.class_mean += 0.2
    obs = Observer("tiny", tiny_observer_model(0).double(), stats, layers=layers, first_layer_weight=10.0)
    _, mom = obs.forward(x[:9].double())
    got = obs.matching(mom, y[:9], 0.4)
    targets = [Target.from_stats(s, dtype=torch.float64) for s in stats.values()]
    want = brute_force_layers(x[:9].double(), y[:9], tiny_observer_model(0).double(), targets, 0.4, [10.0, 1.0])
    torch.testing.assert_close(got.double(), want / (2 if layers == "mean" else 1), rtol=1e-6, atol=1e-8)


def test_running_targets_are_the_batchnorm_running_estimates():
    """targets running: the global terms compare against each BatchNorm's running_mean / running_var (the
    per-class targets stay the measured ones)."""
    x, y = real_like()
    model = tiny_observer_model(0)
    with torch.no_grad():
        for _, bn in bn_layers(model):  # running estimates unlike the data's statistics
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    stats = collect_bn_stats(model, x, y, K, batch_size=7)
    obs = Observer("tiny", model.double(), stats, layers="sum", targets="running")
    running = [(bn.running_mean.double(), bn.running_var.double()) for _, bn in bn_layers(model)]
    targets = [Target(m, v, t.class_mean, t.class_var) for (m, v), t in
               zip(running, (Target.from_stats(s, dtype=torch.float64) for s in stats.values()))]
    _, mom = obs.forward(x[:9].double())
    for alpha in (1.0, 0.3):
        want = brute_force_layers(x[:9].double(), y[:9], model, targets, alpha, [1.0, 1.0])
        torch.testing.assert_close(obs.matching(mom, y[:9], alpha).double(), want, rtol=1e-6, atol=1e-8)
    data = Observer("tiny", model, stats, layers="sum")
    assert not torch.allclose(data.targets[0].mean.double(), running[0][0])


def test_statistics_under_jitter_are_those_of_the_rolled_views():

    x, y = real_like(n=12)
    aug = SynthAugParams(kind="jitter", jitter=2, scale_min=0.5, flip=False)
    model = tiny_observer_model(0)
    got = collect_bn_stats(model, x, y, K, batch_size=6, aug=aug, draws=2, seed=3)
    gen = torch.Generator().manual_seed(3)
    views = []
    for i in range(0, 12, 6):
        for _ in range(2):
            t = sample_jitter(6, 2, False, gen)
            views.append((hand_rolled(x[i:i + 6], t.dy, t.dx, t.flip), y[i:i + 6]))
    want = collect_bn_stats(model, torch.cat([v for v, _ in views]), torch.cat([c for _, c in views]), K,
                            batch_size=100)
    for layer in want:
        torch.testing.assert_close(got[layer].class_var, want[layer].class_var, rtol=1e-5, atol=1e-6)
