"""The paper's applications of a condensed set (Section 4, Fig. 4): continual learning and slimming.

Both read the set through the public format only (:func:`edc.shards.load_condensed`), so they work
on any set, including one made elsewhere and written by ``edc evaluate``'s folder conversion.

**Class-incremental continual learning** (DM's protocol, GDumb-style): the classes arrive in
``steps`` groups in a seeded order; at step t the memory is the condensed images of the classes
seen so far, and a student is trained from scratch on it with the post-evaluation recipe (the
stored plan, filtered to those images) and tested on the test images of the seen classes. Soft
labels are restricted to the seen classes: the stored logits of the other classes are set to -inf,
so their probability is 0 at any temperature. The hard-label variant trains on the class indices.

**Data-free network slimming**: a trained network is pruned to a share of its channels by the
network-slimming criterion (the smallest |BatchNorm scale| over the whole network, channel masks on
the BatchNorm outputs) or of its weights by magnitude (the smallest |w| of every convolution and
linear layer, globally); each pruned network is then recovered by distillation from the unpruned
one on the condensed set alone (the stored plan's views, KL at the evaluation temperature), its
masks held at zero, and tested before and after.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from edc.optim import AdamW, fused
from edc.shards import CondensedDataset


def class_order(num_classes: int, seed: int) -> list[int]:
    """The seeded order in which the classes arrive."""
    return torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()


def class_groups(order: list[int], steps: int) -> list[list[int]]:
    """``order`` cut into ``steps`` consecutive groups, as equal as possible (earlier ones larger)."""
    if not 1 <= steps <= len(order):
        raise ValueError(f"continual.steps must be in [1, {len(order)}] (the classes), got {steps}")
    size, extra = divmod(len(order), steps)
    out, start = [], 0
    for t in range(steps):
        n = size + (1 if t < extra else 0)
        out.append(order[start:start + n])
        start += n
    return out


def restrict_logits(logits: torch.Tensor, seen: list[int]) -> torch.Tensor:
    """Logits with every class outside ``seen`` set to -inf (probability 0 after softmax)."""
    keep = torch.zeros(logits.shape[1], dtype=torch.bool)
    keep[seen] = True
    return logits.masked_fill(~keep, float("-inf"))


class SeenClasses:
    """A condensed set seen through the classes learnt so far: the stored plan's batches keep only
    the views of images of ``seen`` classes (a CutMix view whose partner is of an unseen class is
    dropped too), and soft targets are restricted to ``seen``. Offers what
    :func:`edc.evaluate.train_student` reads from a :class:`CondensedDataset`."""

    def __init__(self, ds: CondensedDataset, seen: list[int]):
        self.ds, self.seen = ds, sorted(seen)
        self.facts, self.labels = ds.facts, ds.labels
        self.keep = torch.isin(ds.hard, torch.tensor(self.seen))
        self._cache: dict[int, list] = {}

    @property
    def epochs(self) -> int:
        return self.ds.epochs

    @property
    def batches_per_epoch(self) -> int:
        return self.ds.batches_per_epoch

    def epoch(self, e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        from edc.plan import augment
        from edc.shards import read_epoch

        for b in read_epoch(self.ds.path, self.ds.meta, e):
            ids = torch.from_numpy(b["ids"])
            rows = self.keep[ids]
            mix = None if b["mix"] is None else torch.from_numpy(b["mix"])
            if mix is not None:
                rows &= self.keep[ids[mix[:, 0]]]
            if not rows.any():
                continue
            x = augment(self.ds.images[ids], torch.from_numpy(b["crops"]), mix,
                        (self.ds.facts.mean, self.ds.facts.std))[rows]
            y = self.ds.hard[ids][rows]
            t = restrict_logits(torch.from_numpy(b["logits"])[rows], self.seen) if self.labels == "soft" else y
            yield x, t, y


def seen_test(test: tuple[torch.Tensor, torch.Tensor], seen: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = test
    sel = torch.isin(y, torch.tensor(seen))
    return x[sel], y[sel]


# --- slimming -------------------------------------------------------------------------------------

def _global_masks(tensors: list[tuple[str, torch.Tensor]], ratio: float) -> dict[str, torch.Tensor]:
    """{name: bool mask of kept entries}: the ``ratio`` share of all entries with the smallest
    magnitude, under one threshold across every tensor, pruned (ties in order)."""
    flat = torch.cat([t.detach().abs().flatten() for _, t in tensors])
    k = int(round(ratio * len(flat)))
    prune = torch.zeros(len(flat), dtype=torch.bool)
    if k > 0:
        prune[torch.argsort(flat, stable=True)[:k]] = True
    out, start = {}, 0
    for name, t in tensors:
        out[name] = ~prune[start:start + t.numel()].view_as(t)
        start += t.numel()
    return out


def bn_masks(model: nn.Module, ratio: float) -> dict[str, torch.Tensor]:
    """Network slimming: {BatchNorm name: bool mask of kept channels}, pruning the ``ratio`` share of
    all BatchNorm channels with the smallest |scale| (one global threshold; ties pruned in order)."""
    return _global_masks([(n, m.weight) for n, m in model.named_modules()
                          if isinstance(m, nn.modules.batchnorm._BatchNorm)], ratio)


def magnitude_masks(model: nn.Module, ratio: float) -> dict[str, torch.Tensor]:
    """{layer name: bool mask of kept weights} pruning the ``ratio`` share of all convolution and
    linear weights with the smallest |w| (one global threshold)."""
    return _global_masks([(n, m.weight) for n, m in model.named_modules()
                          if isinstance(m, (nn.Conv2d, nn.Linear))], ratio)


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor], kind: str) -> None:
    """Zero what ``masks`` prune: a BatchNorm channel's scale and shift (kind "bn"), so the channel
    outputs 0 after it, or the masked weights of a layer (kind "magnitude")."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, keep in masks.items():
            m = mods[name]
            if kind == "bn":
                m.weight.mul_(keep.to(m.weight.dtype))
                m.bias.mul_(keep.to(m.bias.dtype))
            else:
                m.weight.mul_(keep.to(m.weight.dtype))


def sparsity(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / max(total, 1)


def recover(pruned: nn.Module, teacher: nn.Module, masks: dict[str, torch.Tensor], kind: str,
            ds: CondensedDataset, *, epochs: int, lr: float, temperature: float, seed: int) -> nn.Module:
    """Distil ``teacher`` into ``pruned`` on the set's stored plan (its first ``epochs`` epochs), the
    masks re-applied after every step; BatchNorm statistics are those of the training batches."""
    torch.manual_seed(seed)
    opt = AdamW(pruned.parameters(), lr=lr, weight_decay=0.0, **fused(pruned.parameters()))
    teacher.eval()
    pruned.train()
    for e in range(min(epochs, ds.epochs)):
        for x, _, _ in ds.epoch(e):
            with torch.no_grad():
                t = teacher(x)
            out = pruned(x)
            loss = F.kl_div(F.log_softmax(out / temperature, 1), F.softmax(t / temperature, 1),
                            reduction="batchmean") * temperature ** 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            apply_masks(pruned, masks, kind)
    pruned.eval()
    return pruned


def prune(model: nn.Module, kind: str, ratio: float) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A pruned copy of ``model`` and its masks."""
    masks = bn_masks(model, ratio) if kind == "bn" else magnitude_masks(model, ratio)
    pruned = copy.deepcopy(model)
    apply_masks(pruned, masks, kind)
    return pruned, masks
