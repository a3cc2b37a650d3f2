"""The augmentation plan and the teachers' soft labels (the ``relabel`` stage).

For every post-evaluation epoch the plan fixes the order of the images, their batches, each image's
RandomResizedCrop box and flip, and (with CutMix) each batch's box and each image's partner. The
teacher ensemble runs once on every planned batch, and its mean logits are stored, so training a
student replays the plan exactly and never runs a teacher.

The plan itself (:class:`EpochPlan`, :func:`make_plan`, :func:`augment`, :func:`batches`) belongs to
the format and lives in :mod:`edc.plan`; it is re-exported here for the method's callers.
"""

from __future__ import annotations

import torch
from torch import nn

from edc.plan import (  # noqa: F401  (re-exported: the method's callers use them from here)
    CROP_FIELDS,
    MIX_FIELDS,
    EpochPlan,
    augment,
    batches,
    cutmix_box,
    make_plan,
    planned_epochs,
    sample_boxes,
)


@torch.no_grad()
def teacher_logits(teachers: list[nn.Module], x: torch.Tensor, chunk: int = 512, bf16: bool = False) -> torch.Tensor:
    """The ensemble's mean logits (float32, on the CPU) on x, in chunks, teachers in eval mode, on
    the teachers' device (bf16 autocast there when ``bf16`` and it is CUDA)."""
    from edc.runtime import autocast, model_device

    dev = model_device(teachers[0])
    out = []
    for i in range(0, len(x), chunk):
        xb = x[i:i + chunk].to(dev)
        xb = xb.contiguous(memory_format=torch.channels_last) if xb.dim() == 4 else xb
        with autocast(dev, bf16):
            logits = [t.eval()(xb).float() for t in teachers]
        out.append(torch.stack(logits).mean(0).cpu())
    return torch.cat(out)


def epoch_plan_logits(images: torch.Tensor, labels: torch.Tensor, teachers: list[nn.Module] | None, cfg, seed: int,
                      epoch: int, bf16: bool = False) -> tuple[EpochPlan, torch.Tensor | None, int]:
    """Epoch ``epoch`` of a relabel plan for normalised ``images``: the plan (seeded by ``seed`` and
    the epoch alone, so any process can make any epoch), the teachers' mean logits on its augmented
    views in plan order, and how many views the
    teachers put in the image's own class. Without teachers the logits are None (a plan for hard
    labels). ``cfg``: the ``relabel`` params section."""
    from edc.runtime import derive_seed

    n, _, h, w = images.shape
    gen = torch.Generator().manual_seed(derive_seed(seed, "relabel", str(epoch)))
    plan = make_plan(n, h, w, cfg.batch_size, cfg.aug.scale_min, cfg.aug.flip, cfg.cutmix, gen)
    if not teachers:
        return plan, None, 0
    x = torch.cat([augment(images[ids], crops, mix) for ids, crops, mix in batches(plan, cfg.batch_size)])
    logits = teacher_logits(teachers, x, bf16=bf16)
    return plan, logits, int((logits.argmax(1) == labels[plan.order]).sum())

