"""What observers' and students' training share: the step, the state a training resumes from, and
the top-1 accuracy they report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from edc.data import as_split
from edc.distributed import World
from edc.progress import clocked
from edc.runtime import autocast, model_device


@dataclass
class Step:
    """What one step computed on this rank's share of the batch."""

    loss: torch.Tensor  # the mean loss over the share (detached)
    out: torch.Tensor  # the model's output on the share
    targets: tuple[torch.Tensor, ...]  # the targets of the share, on the device
    counts: bool  # whether the share enters the epoch's sums (World.counts)


def train_step(net: nn.Module, opt: torch.optim.Optimizer, sched, x: torch.Tensor, targets: tuple[torch.Tensor, ...],
               loss_fn: Callable[..., torch.Tensor], *, world: World, device: torch.device, bf16: bool) -> Step:
    """One optimiser step on a batch: this rank's share of the rows (:meth:`World.part`; all of them in
    one process) to ``device``, forward under bf16 autocast where asked, ``loss_fn(out, *targets)``,
    the rank-weighted backward (:meth:`World.backward`), the optimiser and the LR schedule."""
    full = len(x)
    part = world.part(full)
    x, targets = x[part].to(device), tuple(t[part].to(device) for t in targets)
    with autocast(device, bf16):
        out = net(x)
        loss = loss_fn(out, *targets)
    opt.zero_grad(set_to_none=True)
    world.backward(loss, part, full)
    opt.step()
    sched.step()
    return Step(loss.detach(), out, targets, world.counts(part, full))


class TrainingState:
    """Named parts of a training (model, optimiser, schedule, EMA, ...: anything with ``state_dict``)
    plus torch's global RNG: saved and restored in one place, so that a resumed run is the run."""

    def __init__(self, **parts):
        self.parts = {k: v for k, v in parts.items() if v is not None}

    def state_dict(self, **extra) -> dict:
        return {**{k: v.state_dict() for k, v in self.parts.items()}, "rng": torch.get_rng_state(), **extra}

    def load_state_dict(self, state: dict) -> dict:
        """Restore every part and the RNG; return the entries that are not parts (the caller's extras)."""
        for k, v in self.parts.items():
            v.load_state_dict(state[k])
        torch.set_rng_state(state["rng"])
        return {k: v for k, v in state.items() if k not in self.parts and k != "rng"}


@torch.no_grad()
def accuracy(model: nn.Module, test, batch_size: int = 1000) -> float:
    """Top-1 accuracy in eval mode on ``test`` ((images, labels) tensors or a SplitView read batch
    by batch); restores the model's previous mode."""
    test = as_split(test)
    was_training = model.training
    model.eval()
    dev = model_device(model)
    correct = sum(int((model(x.to(dev)).argmax(1).cpu() == y).sum()) for x, y in clocked(test.batches(batch_size)))
    model.train(was_training)
    return correct / len(test)
