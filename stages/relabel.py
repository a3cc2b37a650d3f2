"""relabel: fix the post-evaluation plan and store the teachers' soft labels in WebDataset shards."""

from __future__ import annotations

import sys
from pathlib import Path

# Import the edc package next to this script (the one dvc.yaml hashes), also where DVC runs an
# experiment in a copy of the workspace (dvc exp run --queue / --temp) and an editable install
# would otherwise hand it the live workspace's code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edc import distributed
from edc.data import normalize, read_facts
from edc.errors import EdcError
from edc.imageset import read_imageset
from edc.io import publish_dir, read_json, write_json
from edc.observers import load_observer
from edc.params import load_params
from edc.relabel import epoch_plan_logits, planned_epochs
from edc.resume import Checkpointer, fingerprint, run_units
from edc.runtime import inference_copy, place, resolve_device
from edc.shards import CondensedWriter, epoch_shard_name
from edc.stage import parser, stage_main, stage_params
from edc.tracking import stage_run


def main(argv=None) -> None:
    ap = parser("relabel", __doc__)
    ap.add_argument("--data", required=True, help="prepared dataset directory (for its facts)")
    ap.add_argument("--images", required=True, help="synthesized image set (condensed/images)")
    ap.add_argument("--observers", required=True, help="observers directory")
    ap.add_argument("--out", required=True, help="condensed set: shards + meta.json (condensed/shards)")
    ap.add_argument("--report", help="metrics JSON: the set's storage in bytes and the teachers' agreement")
    args = ap.parse_args(argv)
    p = load_params(args.params)
    cfg = p.relabel
    world = distributed.init()
    with stage_run("relabel", stage_params(p, "relabel"), seed=p.seed, enabled=world.main) as run:
        facts = read_facts(args.data)
        if cfg.topk >= facts.num_classes:
            raise EdcError(f"{args.params}: relabel.topk: must be < the {facts.num_classes} classes (0 = all)")
        images_u8, labels, img_meta = read_imageset(args.images)
        images = normalize(images_u8, facts)
        device = resolve_device(p.device)
        # BatchNorm folded, channels-last: the teachers only run forward (edc.runtime.inference_copy)
        teachers = [inference_copy(place(load_observer(args.observers, name)[0], device)) for name in cfg.teachers]
        n, _, h, w = images.shape
        epochs = planned_epochs(cfg.epochs, cfg.min_steps, n, cfg.batch_size)
        meta = {"dataset": facts.to_dict(), "class_names": facts.class_names, "num_classes": facts.num_classes,
                "ipc": img_meta["ipc"], "teachers": cfg.teachers, "epochs": epochs, "batch_size": cfg.batch_size,
                "topk": cfg.topk, "cutmix": cfg.cutmix, "aug": cfg.aug.model_dump(),
                "params": {"seed": p.seed, "relabel": cfg.model_dump(), "synthesis": img_meta}}
        ckpt = Checkpointer(args.out, fingerprint("relabel", stage_params(p, "relabel"),
                                                  [args.data + "/facts.json", args.images,
                                                   *(Path(args.observers) / f"{t}.safetensors" for t in cfg.teachers)],
                                                  code=__file__))

        def epoch_logits(e: int):
            return epoch_plan_logits(images, labels, teachers, cfg, p.seed, e, p.bf16)

        # The set is built in the checkpoint directory itself. Each finished epoch leaves its shard and
        # a small file with its agreement count there, and a rerun after an interruption, with any
        # number of ranks, computes only the epochs without both. Under torchrun the epochs left are
        # dealt out to the ranks (each plan is seeded by its epoch alone); rank 0 writes the images
        # and meta.json and publishes the set once every rank is done.
        def agree_file(e: int) -> Path:
            return ckpt.dir / f".agree-{e:04d}.json"

        made: list[CondensedWriter] = []  # the writer, made by start() once the directory is ready

        def work(e: int) -> None:
            plan, logits, a = epoch_logits(e)
            made[0].write_epoch(e, plan, cfg.batch_size, logits, cfg.topk)
            write_json(agree_file(e), {"agree": a})

        def is_done(e: int) -> bool:
            return agree_file(e).is_file() and (ckpt.dir / epoch_shard_name(e)).is_file()

        def start() -> None:
            made.append(CondensedWriter(ckpt.dir, images_u8, labels, meta, write_images=world.main))

        if not run_units(ckpt, world, range(epochs), is_done, work, "epochs", "relabel", start):
            return
        writer = made[0]
        agree = [read_json(agree_file(e))["agree"] for e in range(epochs)]
        writer.meta["epoch_shards"] = []  # list every epoch, in epoch order, whoever wrote it
        for e in range(epochs):
            writer.keep_epoch(e)
        writer.close()
        keep = {*writer.meta["image_shards"], *writer.meta["epoch_shards"], "meta.json"}
        for f in ckpt.dir.iterdir():  # the checkpoint's own files, and a shard a kill left half-written
            if f.name not in keep:
                f.unlink()
        publish_dir(ckpt.dir, args.out)
        agree = sum(agree)
        # How often the teachers' top class is the image's own class on the augmented views.
        storage = writer.meta["bytes"]
        run.metrics({"teacher_agreement": agree / (n * epochs), **{f"bytes.{k}": v for k, v in storage.items()}})
        if args.report:
            write_json(args.report, {"bytes": storage, "teacher_agreement": round(agree / (n * epochs), 6),
                                     "images": n, "epochs": epochs})
        run.artifact(Path(args.out) / "meta.json", "condensed_set")  # the set's card
        run.dataset(args.out, f"condensed-ipc{p.ipc}", writer.meta["set_id"], context="output")
    print(f"relabel: {n} images x {epochs} epochs of soft labels from {', '.join(cfg.teachers)} -> {args.out} "
          f"(teachers agree with the class on {100 * agree / (n * epochs):.1f}% of augmented views; "
          f"{storage['images'] / 1e6:.2f} MB of images + {storage['soft_labels'] / 1e6:.2f} MB of soft labels, "
          f"{storage['soft_labels_per_image_epoch']:.0f} bytes per image per epoch)")


if __name__ == "__main__":
    stage_main(main)
