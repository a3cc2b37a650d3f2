"""The optimizers the stages use: torch's, without the compiler wrappers that import torch._dynamo."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from edc import optim
from tests.helpers import run


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


@pytest.mark.parametrize("name, kwargs", [
    ("SGD", {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True}),
    ("Adam", {"lr": 0.05, "betas": (0.5, 0.9)}),
    ("AdamW", {"lr": 1e-3, "weight_decay": 0.01, "fused": True}),
    ("AdamW", {"lr": 1e-3, "weight_decay": 0.01}),
])
def test_each_step_is_torchs_bit_for_bit_and_the_state_round_trips(name, kwargs):
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    nets = [_net(), _net()]
    opts = [getattr(optim, name)(nets[0].parameters(), **kwargs),
            getattr(torch.optim, name)(nets[1].parameters(), **kwargs)]
    assert isinstance(opts[0], getattr(torch.optim, name))
    for _ in range(4):
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(p, q)
    resumed = getattr(optim, name)(_net().parameters(), **kwargs)
    resumed.load_state_dict(opts[0].state_dict())
    assert str(resumed.state_dict()) == str(opts[0].state_dict())


def test_a_training_step_does_not_import_torch_dynamo():
    """What the wrappers cost: importing torch._dynamo (1-1.4 s of a stage's start). A MobileNet-V2
    observer (our own, not torchvision's) and each optimizer step without it."""
    code = (
        "import sys, torch\n"
        "from edc.models import create_model\n"
        "from edc.optim import SGD, Adam, AdamW, fused\n"
        "m = create_model('mobilenet_v2', in_channels=1, num_classes=10, image_size=16, width_mult=0.5)\n"
        "for O in (SGD, Adam, AdamW):\n"
        "    o = O(m.parameters(), lr=0.1, **fused(m.parameters()))\n"
        "    o.zero_grad(); m(torch.randn(2, 1, 16, 16)).sum().backward(); o.step(); o.state_dict()\n"
        "print('torch._dynamo' in sys.modules)\n")
    r = run([sys.executable, "-c", code])
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
