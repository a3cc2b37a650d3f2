"""Observer training and the observer checkpoint format.

An observer is saved as two files in the observers directory:

- ``<name>.safetensors``: the model's ``state_dict`` (no pickle; byte-identical for the same seed);
- ``<name>.json``: its spec: ``arch``, ``kwargs``, the dataset facts it was trained on, the
  training params used, the seed, and its final ``test_acc``.

``load_observer(dir, name)`` rebuilds the model from the spec and loads the weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from edc.data import DatasetFacts, as_split
from edc.data.augment import shift_flip
from edc.distributed import World
from edc.errors import ArtifactError
from edc.io import read_json, save_safetensors, write_json
from edc.models import build
from edc.optim import SGD, AdamW, fused
from edc.params import ObserversParams
from edc.progress import progress
from edc.runtime import place
from edc.schedules import lr_lambda
from edc.seeding import derive_seed, seed_everything
from edc.training import accuracy, train_step


@dataclass
class TrainResult:
    model: nn.Module
    test_acc: float
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch
    seconds: float = 0.0


def imagenet_observer(spec, facts: DatasetFacts, test, device: torch.device | None = None) -> TrainResult:
    """An observer with torchvision's ImageNet weights from the hub cache instead of training
    (``weights: imagenet``); its test accuracy is measured on the prepared test split."""
    from edc.models.imagenet import load_imagenet_weights

    if facts.num_classes != 1000:
        raise ArtifactError(f"observers: {spec.name} has ImageNet weights (1000 classes), but the dataset has "
                            f"{facts.num_classes} classes")
    start = time.perf_counter()
    model = place(load_imagenet_weights(build(spec.arch, dict(spec.kwargs), facts), spec.arch),
                  device or torch.device("cpu"))
    return TrainResult(model, accuracy(model, test), [], time.perf_counter() - start)


def train_observer(spec, cfg: ObserversParams, facts: DatasetFacts, train, test, seed: int, *,
                   device: torch.device | None = None, bf16: bool = False, world: World | None = None) -> TrainResult:
    """Train one observer (``spec``: ObserverSpec) with ``cfg`` (ObserversParams) on ``train``:
    normalised (images, labels) tensors or a SplitView read batch by batch in each epoch's order.
    The test split is used once, after the last epoch, to report accuracy (by rank 0 alone under
    torchrun, where the ranks share every batch through DistributedDataParallel: edc.distributed)."""
    world = world or World()
    gen = seed_everything(derive_seed(seed, "observer", spec.name))
    device = device or torch.device("cpu")
    model = place(build(spec.arch, dict(spec.kwargs), facts), device)
    net = world.wrap(model)
    if cfg.optimizer == "sgd":
        opt = SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              **fused(model.parameters()))
    else:
        opt = AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                **fused(model.parameters()))
    train = as_split(train)
    n = len(train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.schedule, cfg.epochs * steps_per_epoch))
    history, start = [], time.perf_counter()
    model.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        loss_sum, correct = 0.0, 0
        bar = progress(train.batches(cfg.batch_size, order), total=steps_per_epoch,
                       desc=f"{spec.name} epoch {epoch + 1}/{cfg.epochs}", unit="batch")
        for xb, yb in bar:
            xb = shift_flip(xb, cfg.augment.crop_padding, cfg.augment.flip, gen)  # the whole batch, every rank
            step = train_step(net, opt, sched, xb, (yb,), F.cross_entropy, world=world, device=device,
                              bf16=bf16)
            if step.counts:
                (y,) = step.targets
                loss_sum += float(step.loss) * len(y)
                correct += int((step.out.argmax(1) == y).sum())
        loss_sum, correct = world.all_sum(loss_sum, correct)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / n, "train_acc": correct / n,
               "lr": opt.param_groups[0]["lr"]}
        history.append(row)
        print(f"[{spec.name}] epoch {epoch + 1}/{cfg.epochs} loss {row['train_loss']:.4f} "
              f"train_acc {row['train_acc']:.4f}", flush=True)
    test_acc = accuracy(model, test) if world.main else float("nan")
    return TrainResult(model.eval(), test_acc, history, time.perf_counter() - start)


def save_observer(directory: str | Path, name: str, model: nn.Module, spec: dict[str, Any]) -> None:
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(directory / f"{name}.safetensors", state, {"name": name, "arch": spec["arch"]})
    write_json(directory / f"{name}.json", spec)


def observer_names(directory: str | Path) -> list[str]:
    """Names of the observers saved in ``directory`` (sorted)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: observers directory not found; run the train_observers stage")
    return sorted(p.stem for p in directory.glob("*.json"))


def load_observer(directory: str | Path, name: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild observer ``name`` from its spec and weights; returns (model in eval mode, spec)."""
    directory = Path(directory)
    spec_file, weights = directory / f"{name}.json", directory / f"{name}.safetensors"
    for f in (spec_file, weights):
        if not f.is_file():
            raise ArtifactError(f"{f}: missing; run the train_observers stage")
    spec = read_json(spec_file)
    facts = DatasetFacts.from_dict(spec["dataset"])
    model = build(spec["arch"], spec["kwargs"], facts)
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ArtifactError(f"{weights}: unreadable checkpoint ({exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ArtifactError(f"{weights}: does not match architecture {spec['arch']} {spec['kwargs']} "
                            f"described in {spec_file} ({first})") from None
    return model.eval(), spec
