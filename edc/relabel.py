"""The augmentation plan and the teachers' soft labels (the ``relabel`` stage).

For every post-evaluation epoch the plan fixes the order of the images, their batches, each image's
RandomResizedCrop box and flip, and (with CutMix) each batch's box and each image's partner. The
teacher ensemble runs once on every planned batch, and its mean logits are stored, so training a
student replays the plan exactly and never runs a teacher.

The plan itself (:class:`EpochPlan`, :func:`make_plan`, :func:`augment`, :func:`batches`) belongs to
the format and lives in :mod:`edc.plan`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edc.distributed import World
from edc.io import publish_dir, read_json, write_json
from edc.params import RelabelParams
from edc.plan import EpochPlan, augment, batches, make_plan
from edc.resume import Checkpointer, run_units
from edc.shards import CondensedWriter, LabelLayout


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


def epoch_plan_logits(images: torch.Tensor, labels: torch.Tensor, teachers: list[nn.Module] | None,
                      cfg: RelabelParams, seed: int, epoch: int, *, bf16: bool = False, pixels: tuple | None = None
                      ) -> tuple[EpochPlan, torch.Tensor | None, int]:
    """Epoch ``epoch`` of a relabel plan for normalised ``images``: the plan (seeded by ``seed`` and
    the epoch alone, so any process can make any epoch), the teachers' mean logits on its augmented
    views in plan order, and how many views the
    teachers put in the image's own class. Without teachers the logits are None (a plan for hard
    labels). ``cfg``: the ``relabel`` params section; ``pixels``: the dataset's (mean, std), which
    RandAugment (``relabel.aug.randaugment``) needs."""
    from edc.seeding import derive_seed

    n, _, h, w = images.shape
    gen = torch.Generator().manual_seed(derive_seed(seed, "relabel", str(epoch)))
    plan = make_plan(n, h, w, cfg.batch_size, cfg.aug.scale_min, cfg.aug.flip, cutmix=cfg.cutmix, gen=gen,
                     randaugment=cfg.aug.randaugment, magnitude=cfg.aug.magnitude)
    if not teachers:
        return plan, None, 0
    x = torch.cat([augment(images[ids], crops, mix, pixels) for ids, crops, mix in batches(plan, cfg.batch_size)])
    logits = teacher_logits(teachers, x, bf16=bf16)
    return plan, logits, int((logits.argmax(1) == labels[plan.order]).sum())



def relabel_set(images_u8: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, teachers: list[nn.Module],
                cfg: RelabelParams, *, seed: int, bf16: bool, meta: dict, world: World, ckpt: Checkpointer,
                out: str | Path, pixels: tuple | None = None) -> tuple[dict, int] | None:
    """Write the condensed set to ``out``: the images, and for every stored epoch (``meta["stored_epochs"]``
    of them) its plan and the teachers' labels (:func:`epoch_plan_logits`; ``pixels``: the dataset's
    (mean, std), for RandAugment), several epochs per label shard (:class:`edc.shards.LabelLayout`).

    The set is built in ``ckpt``'s directory itself. Each finished label shard leaves its file and a
    small file with its agreement count there, and a rerun after an interruption, with any number of
    ranks, computes only the shards without both. Under torchrun the shards left are dealt out to the
    ranks (each plan is seeded by its epoch alone; :func:`edc.resume.run_units`); rank 0 writes the
    images and meta.json and publishes the set once every rank is done. Returns (the set's meta, how
    many stored views the teachers put in the image's own class) on rank 0, None on the others."""
    layout = LabelLayout.plan({**meta, "num_images": len(labels)}, cfg.shard_bytes)

    def agree_file(j: int) -> Path:
        return ckpt.dir / f".agree-{j:06d}.json"

    made: list[CondensedWriter] = []  # the writer, made by start() once the directory is ready

    def start() -> None:
        made.append(CondensedWriter(ckpt.dir, images_u8, labels, meta, write_images=world.main,
                                    shard_bytes=cfg.shard_bytes))

    def work(j: int) -> None:
        writer, done, agree = made[0], [], 0
        for e in writer.layout.epochs(j):
            plan, logits, a = epoch_plan_logits(images, labels, teachers, cfg, seed, e, bf16=bf16, pixels=pixels)
            done.append((plan, logits))
            agree += a
        writer.write_shard(j, done)
        write_json(agree_file(j), {"agree": agree})

    def is_done(j: int) -> bool:
        return agree_file(j).is_file() and (ckpt.dir / layout.names[j]).is_file()

    if not run_units(ckpt, world, range(layout.shards), is_done, work, what="shards", stage="relabel", start=start):
        return None
    writer = made[0]
    agree = sum(read_json(agree_file(j))["agree"] for j in range(layout.shards))
    writer.close()
    keep = {*writer.meta["image_shards"], *writer.meta["label_shards"], "meta.json"}
    for f in ckpt.dir.iterdir():  # the checkpoint's own files, and a shard a kill left half-written
        if f.name not in keep:
            f.unlink()
    publish_dir(ckpt.dir, out)
    return writer.meta, agree
