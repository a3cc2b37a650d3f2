"""Post-evaluation: train students only from a condensed set's shards and test them.

No teacher runs here: the soft labels are the ones stored by ``relabel`` for exactly the batches,
crops, flips and CutMix boxes the plan fixes. Loss ``kl``: KL(softmax(teacher/T) || softmax(student/T))
* T^2; ``mse_ce``: MSE(student logits, teacher logits) + 0.025 * CE(student, hard label), the public
CIFAR recipe; with hard labels, plain cross-entropy. AdamW, a schedule from ``edc.schedules`` over
the training steps, and an EMA of the weights (``torch.optim.swa_utils``) that is the evaluated model.

The EMA has a warm-up: after n updates its decay is ``min(ema_rate, (1 + n) / (ema_warmup + n))``, so
that a short training (1,000 steps at ipc 1) does not leave the evaluated model holding a share of its
random initial weights (``ema_rate ** steps``: 0.99^200 = 13 %). Only the parameters are averaged;
the BatchNorm running statistics of the EMA model are recomputed from the condensed set's own planned
batches before it is tested (:func:`recompute_bn`, as ``torch.optim.swa_utils.update_bn`` does for a
loader), because averaged statistics match neither the averaged weights nor the data.
The reported accuracy is the final model's top-1 on the test split: the test split never selects an
epoch or a checkpoint (it is evaluated every ``eval_every`` epochs for the curves only).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel

from edc.distributed import World
from edc.observers import accuracy, build
from edc.runtime import autocast, fused, place, progress, seed_everything
from edc.schedules import lr_lambda
from edc.shards import CondensedDataset


@dataclass
class StudentResult:
    acc: float  # the evaluated model (EMA when enabled) on the test split, after the last epoch
    raw_acc: float  # the raw (non-EMA) weights, logged for comparison
    curve: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    val_acc: float | None = None  # the same two on the validation split (dataset.val_size > 0)
    raw_val_acc: float | None = None


def student_loss(kind: str, out: torch.Tensor, target: torch.Tensor, hard: torch.Tensor, temperature: float,
                 soft: bool) -> torch.Tensor:
    if not soft:
        return F.cross_entropy(out, hard)
    if kind == "kl":
        t = temperature
        log_p_student = F.log_softmax(out / t, dim=1)
        p_teacher = F.softmax(target / t, dim=1)
        return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * t * t
    return F.mse_loss(out, target) + 0.025 * F.cross_entropy(out, hard)


def ema_decay(rate: float, warmup: int, n: int) -> float:
    """The EMA decay applied at the update after ``n`` earlier ones: ``rate`` once warmed up, smaller
    before (``(1 + n) / (warmup + n)``; ``warmup`` 0 = no warm-up)."""
    return rate if warmup <= 0 else min(rate, (1 + n) / (warmup + n))


def warmup_ema(rate: float, warmup: int) -> Callable:
    """A ``multi_avg_fn`` for ``AveragedModel``: ema <- d * ema + (1 - d) * current, d = :func:`ema_decay`."""

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        d = ema_decay(rate, warmup, int(num_averaged))
        torch._foreach_lerp_(ema_params, params, 1.0 - d)

    return update


def has_running_stats(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


@torch.no_grad()
def recompute_bn(model: nn.Module, ds: CondensedDataset, device: torch.device, upto: int | None = None,
                 min_batches: int = 10) -> int:
    """Reset the BatchNorm running statistics of ``model`` and recompute them, as a plain average
    (``momentum=None``), in train mode over the planned batches of the epochs before ``upto`` (default:
    all the set's epochs), the last ones first needed to make at least ``min_batches`` batches: the
    inputs the student was trained on most recently. Returns the number of batches used."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    upto = ds.epochs if upto is None else upto
    first = max(0, upto - -(-min_batches // ds.batches_per_epoch))
    used = 0
    for e in range(first, upto):
        for x, _, _ in ds.epoch(e):
            model(x.to(device))
            used += 1
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.train(was_training)
    return used


def train_student(spec, cfg, zeta: float, ds: CondensedDataset, test,
                  seed: int, log: Callable[[dict], None] | None = None, resume: dict | None = None,
                  on_epoch: Callable[[Callable[[], dict]], None] | None = None, device: torch.device | None = None,
                  bf16: bool = False, world: World | None = None, val=None) -> StudentResult:
    """Train one student (``spec``: an ObserverSpec-like arch/kwargs) with the ``evaluate`` params;
    ``test`` and ``val`` (optional): (images, labels) tensors or a SplitView.

    ``on_epoch(snapshot)`` is called after every epoch; ``snapshot()`` returns the whole training
    state, which ``resume=`` continues from exactly (same weights, same result). Under torchrun
    (``world``) the ranks share every planned batch through DistributedDataParallel (see
    edc.distributed); rank 0 alone evaluates, and the other ranks return NaN accuracies."""
    world = world or World()
    seed_everything(seed)
    device = device or torch.device("cpu")
    model = place(build(spec.arch, dict(spec.kwargs), ds.facts), device)
    net = world.wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **fused(model.parameters()))
    total = ds.epochs * ds.batches_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.schedule, total, zeta, cfg.milestones, cfg.gamma))
    ema = AveragedModel(model, multi_avg_fn=warmup_ema(cfg.ema_rate, cfg.ema_warmup),
                        use_buffers=False) if cfg.ema else None
    bn_ready = {"epoch": None}

    def evaluated(epoch: int) -> nn.Module:
        if ema is None:
            return model
        if bn_ready["epoch"] != epoch and has_running_stats(ema.module):
            recompute_bn(ema.module, ds, device, epoch)
            bn_ready["epoch"] = epoch
        return ema.module
    soft = ds.labels == "soft"
    curve, start, first = [], time.perf_counter(), 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["opt"])
        sched.load_state_dict(resume["sched"])
        if ema is not None:
            ema.load_state_dict(resume["ema"])
        torch.set_rng_state(resume["rng"])
        curve, first = list(resume["curve"]), resume["epoch"]

    def snapshot(epoch: int) -> dict:
        return {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "rng": torch.get_rng_state(),
                "curve": curve, "epoch": epoch}

    model.train()
    for e in progress(range(first, ds.epochs), desc=f"{spec.name} seed {seed}", unit="epoch"):
        loss_sum, n = 0.0, 0
        for x, target, hard in ds.epoch(e):
            full = len(x)
            part = world.part(full)
            x, target, hard = x[part].to(device), target[part].to(device), hard[part].to(device)
            with autocast(device, bf16):
                out = net(x)
                loss = student_loss(cfg.loss, out.float(), target, hard, cfg.temperature, soft)
            opt.zero_grad(set_to_none=True)
            world.backward(loss, part, full)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            if world.counts(part, full):
                loss_sum += loss.item() * len(x)
                n += len(x)
        loss_sum, n = world.all_sum(loss_sum, n)
        row = {"epoch": e + 1, "train_loss": loss_sum / n}
        if world.main and ((e + 1) % cfg.eval_every == 0 or e + 1 == ds.epochs):
            row["test_acc"] = accuracy(evaluated(e + 1), test)
            if ema is not None:  # the raw weights beside the EMA: how much the average adds, epoch by epoch
                row["raw_test_acc"] = accuracy(model, test)
            if val is not None:
                row["val_acc"] = accuracy(evaluated(e + 1), val)
        curve.append(row)
        if log is not None:
            log(row)
        if on_epoch is not None:
            on_epoch(lambda e=e: snapshot(e + 1))
    if not world.main:
        return StudentResult(float("nan"), float("nan"), curve, time.perf_counter() - start)
    final = evaluated(ds.epochs)
    last = curve[-1] if curve and curve[-1]["epoch"] == ds.epochs else {}

    def measured(key: str, net: nn.Module, split) -> float:  # the last epoch's evaluation, when it was made
        return last[key] if key in last else accuracy(net, split)

    acc = measured("test_acc", final, test)
    raw = measured("raw_test_acc", model, test) if ema is not None else acc
    val_acc = raw_val = None
    if val is not None:
        val_acc = measured("val_acc", final, val)
        raw_val = accuracy(model, val) if ema is not None else val_acc
    return StudentResult(acc, raw, curve, time.perf_counter() - start, val_acc, raw_val)


def summarize(accs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    t = torch.tensor(accs, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(accs) > 1 else 0.0
