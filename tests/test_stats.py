"""Per-class BatchNorm statistics against a brute-force computation on a hand-sized model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edc.errors import ArtifactError
from edc.stats import bn_layers, collect_bn_stats, load_stats, save_stats


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2),
                      nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 2 * 2, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    for bn in bn_layers(m):  # non-trivial running statistics, so eval mode differs from train mode
        bn[1].running_mean.uniform_(-1, 1)
        bn[1].running_var.uniform_(0.5, 2)
    return m


def brute_force(model, x, y, k):
    """Capture every BN input for the whole set in one forward and compute moments per class."""
    captured = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: captured.__setitem__(n, inp[0].detach()))
             for n, m in bn_layers(model)]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    out = {}
    for name, act in captured.items():
        a = act.double().transpose(0, 1)  # (C, N, ...)
        per_class = [a[:, y == c].reshape(len(a), -1) for c in range(k)]  # (C, n_c*H*W) each
        everything = a.reshape(len(a), -1)
        out[name] = {
            "mean": everything.mean(1),
            "var": everything.var(1, unbiased=False),
            "class_mean": torch.stack([v.mean(1) for v in per_class]),
            "class_var": torch.stack([v.var(1, unbiased=False) for v in per_class]),
            "class_count": torch.tensor([float(v.shape[1]) for v in per_class], dtype=torch.float64),
            # each image's own spatial variance, averaged over the class's images
            "class_within_var": torch.stack([a[:, y == c].reshape(len(a), int((y == c).sum()), -1)
                                             .var(2, unbiased=False).mean(1) for c in range(k)]),
        }
    return out


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_statistics_equal_brute_force_per_class_moments(offset):
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(13, 2, 5, 5, generator=g) + offset
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 0, 1])  # unbalanced, classes interleaved
    stats = collect_bn_stats(model, x, y, num_classes=3, batch_size=4)  # uneven batches: 4+4+4+1
    ref = brute_force(model, x, y, 3)
    assert list(stats) == ["1", "4", "7"]
    for layer, s in stats.items():
        for key, want in ref[layer].items():
            got = getattr(s, key)
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{layer}.{key}")


def test_a_channel_whose_mean_is_1000_times_its_spread_keeps_its_variance():
    """Sums of squares taken without a shift would lose the variance to cancellation here (float32
    carries 7 digits, mean^2 / variance is 10^6); the accumulator shifts such channels."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(12, 2, 4, 4, generator=g, dtype=torch.float64)
    x[:, 0] += 1000.0  # channel 0: mean 1000, spread 1; channel 1: well conditioned
    y = torch.arange(12) % 3
    model = nn.Sequential(nn.BatchNorm2d(2)).eval()
    stats = collect_bn_stats(model, x.float(), y, num_classes=3, batch_size=5)["0"]
    xf = x.float().double()  # the values the float32 pass sees
    torch.testing.assert_close(stats.var, xf.transpose(0, 1).reshape(2, -1).var(1, unbiased=False), rtol=1e-5, atol=0)
    for c in range(3):
        want = xf[y == c].transpose(0, 1).reshape(2, -1).var(1, unbiased=False)
        torch.testing.assert_close(stats.class_var[c], want, rtol=1e-5, atol=0)
        own = xf[y == c].reshape(4, 2, -1).var(2, unbiased=False).mean(0)
        torch.testing.assert_close(stats.class_within_var[c], own, rtol=1e-4, atol=0)


class _SharedAndSkipped(nn.Module):
    """One BatchNorm applied twice per forward, another only to batches of more than 3 images: the
    forwards where the layers do not each run once, in order."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv, self.bn, self.conv2, self.bn2 = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), \
            nn.BatchNorm2d(3)

    def forward(self, x):
        h = self.bn(self.bn(self.conv(x)))
        return self.bn2(self.conv2(h)) if len(x) > 3 else h


def test_layers_run_twice_or_skipped_sum_every_input_they_saw():
    """Each call of a layer adds its input under the batch's labels: brute force over every call."""
    model, g = _SharedAndSkipped().eval(), torch.Generator().manual_seed(5)
    x, y = torch.randn(13, 2, 6, 6, generator=g) * 2 + 1, torch.tensor([0, 1, 2, 0, 1, 2, 2, 2, 0, 1, 0, 1, 2])
    calls = {"bn": [], "bn2": []}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: calls[n].append((inp[0].double(), labels)))
             for n, m in (("bn", model.bn), ("bn2", model.bn2))]
    with torch.no_grad():
        for i in range(0, 13, 4):  # the batches collect_bn_stats will make: 4 + 4 + 4 + 1
            labels = y[i:i + 4]
            model(x[i:i + 4])
    for h in hooks:
        h.remove()
    stats = collect_bn_stats(model, x, y, num_classes=3, batch_size=4)
    assert len(calls["bn"]) == 8 and len(calls["bn2"]) == 3
    for name, seen in calls.items():
        a = torch.cat([t for t, _ in seen]).transpose(0, 1)  # (C, calls' images, H, W)
        lab = torch.cat([labs for _, labs in seen])
        for c in range(3):
            v = a[:, lab == c].reshape(3, -1)
            torch.testing.assert_close(stats[name].class_mean[c], v.mean(1), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(stats[name].class_var[c], v.var(1, unbiased=False), rtol=1e-5, atol=1e-6)
            assert stats[name].class_count[c] == v.shape[1]
            own = a[:, lab == c].reshape(3, int((lab == c).sum()), -1).var(2, unbiased=False).mean(1)
            torch.testing.assert_close(stats[name].class_within_var[c], own, rtol=1e-5, atol=1e-6)


def test_batch_size_does_not_change_the_statistics():
    model, g = tiny_model(), torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 2, 5, 5, generator=g), torch.arange(20) % 3
    a = collect_bn_stats(model, x, y, 3, batch_size=20)
    b = collect_bn_stats(model, x, y, 3, batch_size=3)
    for layer in a:
        torch.testing.assert_close(a[layer].class_var, b[layer].class_var, rtol=1e-6, atol=1e-9)


def test_pass_is_eval_mode_and_restores_training_mode():
    model, x, y = tiny_model().train(), torch.randn(6, 2, 5, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    before = {n: m.running_mean.clone() for n, m in bn_layers(model)}
    collect_bn_stats(model, x, y, 3)
    assert model.training
    for n, m in bn_layers(model):  # eval mode: running statistics untouched
        assert torch.equal(m.running_mean, before[n])


def test_save_and_load_round_trip(tmp_path):
    model, x, y = tiny_model(), torch.randn(9, 2, 5, 5), torch.arange(9) % 3
    stats = collect_bn_stats(model, x, y, 3)
    f = tmp_path / "tiny.safetensors"
    save_stats(f, stats, {"observer": "tiny", "arch": "seq", "num_classes": 3})
    loaded, meta = load_stats(f)
    assert list(loaded) == list(stats) and meta["observer"] == "tiny" and meta["format"] == "edc-stats/1"
    for layer in stats:
        assert torch.equal(loaded[layer].class_mean, stats[layer].class_mean)
    from safetensors.torch import load_file
    keys = set(load_file(str(f)))
    assert {"1.mean", "1.var", "1.class_mean", "1.class_var", "1.class_count"} <= keys


def test_errors_are_clear(tmp_path):
    with pytest.raises(ArtifactError, match="no BatchNorm layers"):
        collect_bn_stats(nn.Sequential(nn.Conv2d(1, 1, 1)), torch.randn(2, 1, 3, 3), torch.tensor([0, 1]), 2)
    with pytest.raises(ArtifactError, match=r"no images of class\(es\) \[2\]"):
        collect_bn_stats(tiny_model(), torch.randn(4, 2, 5, 5), torch.tensor([0, 1, 0, 1]), 3)
    with pytest.raises(ArtifactError, match="statistics file not found"):
        load_stats(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="junk.safetensors: unreadable statistics file"):
        load_stats(tmp_path / "junk.safetensors")


def test_files_are_byte_identical_for_identical_statistics(tmp_path):
    """safetensors writes multi-key metadata in random order; ours must not vary run to run."""
    model, x, y = tiny_model(), torch.randn(9, 2, 5, 5), torch.arange(9) % 3
    stats = collect_bn_stats(model, x, y, 3)
    meta = {"observer": "tiny", "arch": "seq", "num_classes": 3, "images": 9, "observer_md5": "x"}
    blobs = set()
    for i in range(8):
        save_stats(tmp_path / f"{i}.safetensors", stats, meta)
        blobs.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(blobs) == 1
