"""Inference copies (teachers, the flatness term's EMA forward): BatchNorm folded into the convolution
before it without tracing, the same bytes as torch.fx's fold, and a copy independent of its model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from edc.models import create_model, inference
from edc.models.inference import fold_conv_bn, frozen_clone, inference_copy
from edc.models.zoo import BasicBlock
from edc.stats import bn_layers

DEFAULT_OBSERVERS = [("convnet", {"width": 16, "depth": 3, "norm": "batch"}), ("resnet18", {"width": 8}),
                     ("mobilenet_v2", {"width_mult": 0.5})]


def trained_looking(arch: str, kwargs: dict, seed: int = 0) -> nn.Module:
    """A model whose BatchNorms are far from the identity, as a trained observer's are."""
    torch.manual_seed(seed)
    m = create_model(arch, in_channels=3, num_classes=10, image_size=32, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, bn in bn_layers(m):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.weight.copy_(torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    return m.eval()


@pytest.mark.parametrize("arch, kwargs", DEFAULT_OBSERVERS)
def test_fold_is_torch_fx_fold_byte_for_byte(arch, kwargs):
    """Each default observer declares its convolution-BatchNorm pairs: the fold leaves no BatchNorm, its
    weights equal torch.fx's fold of the same model exactly, and so do its outputs, so the teachers'
    soft labels and synthesis keep their bytes."""
    m = trained_looking(arch, kwargs)
    ours, theirs = fold_conv_bn(m), fuse(m)
    assert ours is not None and not bn_layers(ours)
    a = [p for p in ours.parameters()]
    b = [p for p in theirs.parameters()]
    assert len(a) == len(b) < len(list(m.parameters()))  # a BatchNorm's two become its convolution's bias
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        torch.testing.assert_close(ours(x), m(x), rtol=1e-4, atol=1e-4)
        xc = x.contiguous(memory_format=torch.channels_last)
        fx_cl = fuse(m).to(memory_format=torch.channels_last)(xc)
        assert torch.equal(ours.to(memory_format=torch.channels_last)(xc), fx_cl)
        torch.testing.assert_close(inference_copy(m)(xc), fx_cl, rtol=1e-5, atol=1e-5)  # + fused activations


def test_a_declared_pair_is_folded_and_a_model_without_declarations_is_traced():
    """A pair named in ``CONV_BN`` is folded; a pair neither adjacent in a Sequential nor declared stays a
    BatchNorm (it may be used elsewhere); a model that declares nothing goes through torch.fx."""

    class Block(nn.Module):
        CONV_BN = (("a", "bn_a"),)

        def __init__(self):
            super().__init__()
            self.a, self.bn_a = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
            self.b, self.bn_b = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.b(torch.relu(self.bn_a(self.a(x))))
            return self.bn_b(y) + y  # b's output is used twice: folding bn_b into b would be wrong

    torch.manual_seed(0)
    blk = Block().eval()
    with torch.no_grad():
        for bn in (blk.bn_a, blk.bn_b):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    folded = fold_conv_bn(blk)
    assert isinstance(folded.bn_a, nn.Identity) and isinstance(folded.bn_b, nn.BatchNorm2d)
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), blk(x), rtol=1e-5, atol=1e-5)

    class Undeclared(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.c(x))

    assert fold_conv_bn(Undeclared()) is None
    traced = inference_copy(Undeclared())
    assert not bn_layers(traced)  # folded by torch.fx's tracing instead


def test_frozen_clone_is_independent_of_its_model():
    """The copy has its own parameters (no gradient), buffers and hooks: training or tapping the model
    afterwards (synthesis registers its taps after the copy is made) does not reach the copy."""
    m = trained_looking("resnet18", {"width": 8})
    c = frozen_clone(m)
    assert all(not p.requires_grad for p in c.parameters())
    assert all(p.requires_grad for p in m.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(m.parameters(), c.parameters()))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = c(x)
        seen = []
        m.layers[0][0].bn1.register_forward_hook(lambda *a: seen.append(1))
        m.bn1.running_mean.add_(5.0)
        next(m.parameters()).add_(1.0)
        assert torch.equal(c(x), before) and not seen
        m(x)
    assert seen == [1]


ONEDNN = pytest.mark.skipif(inference._CONV_POINTWISE is None, reason="this torch build has no oneDNN convolutions")


@ONEDNN
@pytest.mark.parametrize("arch, kwargs", DEFAULT_OBSERVERS)
def test_activations_inside_the_convolutions_compute_the_same_function(arch, kwargs):
    """The inference copy runs each ReLU / ReLU6 (and ResNet's residual sums) inside the convolution
    before it: its outputs equal those of the folded copy that runs them separately, to rounding
    (bit for bit in the default run, 2 threads on this project's CPU: `dvc repro` kept every output
    hash; with one thread MobileNet-V2's last 1x1 convolution takes another oneDNN kernel when fused,
    3e-6 apart, as its unfused forward differs between 1 and 2 threads); and some were fused."""
    m = trained_looking(arch, kwargs)
    fused = inference_copy(m)
    plain = fold_conv_bn(m).to(memory_format=torch.channels_last)
    assert sum(isinstance(k, inference.ConvAct) for k in fused.modules()) >= 3
    assert not any(isinstance(k, inference.ConvAct) for k in plain.modules())
    x = torch.randn(6, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)


@ONEDNN
@pytest.mark.parametrize("cin, stride", [(4, 1), (4, 2)])  # the identity shortcut and the projection one
def test_a_basic_block_sums_its_shortcut_inside_the_second_convolution(cin, stride):
    torch.manual_seed(1)
    blk = BasicBlock(4, 4 if stride == 1 else 8, stride).eval()
    with torch.no_grad():
        for _, bn in bn_layers(blk):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    fused = inference_copy(blk)
    assert fused.fused and isinstance(fused.conv2, inference.ConvAct) and fused.conv2.add
    x = torch.randn(3, cin, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), fold_conv_bn(blk).to(memory_format=torch.channels_last)(x), rtol=1e-6,
                                   atol=1e-6)
        torch.testing.assert_close(fused(x), blk(x), rtol=1e-5, atol=1e-5)


def test_only_a_convolution_whose_output_reaches_the_activation_directly_is_fused():
    """Across a folded BatchNorm (an identity) yes; across a GroupNorm, or where the module's own
    BatchNorms are not folded, no; ConvAct's plain path (float64, or with gradients) is the separate
    operations, gradients included."""
    torch.manual_seed(2)
    seq = nn.Sequential(nn.Conv2d(2, 3, 3), nn.GroupNorm(3, 3), nn.ReLU(), nn.Conv2d(3, 3, 1), nn.Identity(),
                        nn.ReLU6())
    inference.fuse_activations(seq)
    assert type(seq[0]) is nn.Conv2d and type(seq[2]) is nn.ReLU  # a GroupNorm between
    assert inference._CONV_POINTWISE is None or (type(seq[3]) is inference.ConvAct and seq[3].act == "hardtanh"
                                               and type(seq[5]) is nn.Identity)  # across a folded BatchNorm
    unfolded = inference.fuse_activations(frozen_clone(BasicBlock(3, 3, 1).eval()))
    assert not unfolded.fused and type(unfolded.conv1) is nn.Conv2d  # its BatchNorms are still there
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    act = inference.ConvAct(conv, "hardtanh", (0.0, 6.0), add=True)
    x, other = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True), torch.randn(2, 3, 5, 5).double()
    assert torch.equal(act(x, other), nn.functional.hardtanh(conv(x) + other, 0.0, 6.0))
    act(x, other).sum().backward()
    assert x.grad is not None and conv.weight.grad is not None
