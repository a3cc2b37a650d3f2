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
from edc.io import write_json
from edc.models.inference import inference_copy
from edc.observers import load_observer
from edc.params import load_params
from edc.plan import planned_epochs, stored_epochs
from edc.relabel import relabel_set
from edc.resume import Checkpointer, fingerprint
from edc.runtime import place, resolve_device
from edc.seeding import trial_meta, trial_seed
from edc.stage import parser, stage_main, stage_params
from edc.tracking import stage_run

PATHS = {  # --NAME: help (all required)
    "data": "prepared dataset directory (for its facts)",
    "images": "synthesized image set (condensed/images)",
    "observers": "observers directory",
    "out": "condensed set: shards + meta.json (condensed/shards)",
}
OPTIONAL = {
    "report": "metrics JSON: the set's storage in bytes and the teachers' agreement",
}


def main(argv=None) -> None:
    args = parser("relabel", __doc__, PATHS, OPTIONAL).parse_args(argv)
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
        # BatchNorm folded, channels-last: the teachers only run forward (edc.models.inference.inference_copy)
        teachers = [] if cfg.codec == "hard" else [  # hard labels: only the plan is stored
            inference_copy(place(load_observer(args.observers, name)[0], device)) for name in cfg.teachers]
        n, _, h, w = images.shape
        epochs = planned_epochs(cfg.epochs, cfg.min_steps, n, cfg.batch_size)
        stored = stored_epochs(cfg.label_epochs, epochs, cfg.label_views, img_meta["ipc"])
        meta = {"dataset": facts.to_dict(), "class_names": facts.class_names, "num_classes": facts.num_classes,
                "ipc": img_meta["ipc"], "teachers": cfg.teachers, "epochs": epochs, "stored_epochs": stored,
                "batch_size": cfg.batch_size, "codec": cfg.codec, "topk": cfg.topk, "cutmix": cfg.cutmix,
                "aug": cfg.aug.model_dump(),
                "params": {"seed": p.seed, **trial_meta(p.trial), "relabel": cfg.model_dump(),
                           # how the images were made; synthesis's loss diagnostics stay in reports/synth.json
                           "synthesis": {k: v for k, v in img_meta.items() if k != "matching"}}}
        ckpt = Checkpointer(args.out, fingerprint("relabel", stage_params(p, "relabel"),
                                                  [args.data + "/facts.json", args.images,
                                                   *(Path(args.observers) / f"{t}.safetensors" for t in cfg.teachers)],
                                                  code=__file__))

        published = relabel_set(images_u8, images, labels, teachers, cfg, seed=trial_seed(p.seed, p.trial),
                                bf16=p.bf16, meta=meta, world=world, ckpt=ckpt, out=args.out,
                                pixels=(facts.mean, facts.std))
        if published is None:  # ranks other than 0 under torchrun
            return
        set_meta, agree = published
        # How often the teachers' top class is the image's own class on the stored augmented views
        # (none are labelled when the set stores hard labels).
        agreement = None if cfg.codec == "hard" else round(agree / (n * stored), 6)
        storage = set_meta["bytes"]
        run.metrics({**({} if agreement is None else {"teacher_agreement": agreement}),
                     **{f"bytes.{k}": v for k, v in storage.items() if k != "per_image_epoch"},
                     **{f"bytes_per_image_epoch.{k}": v for k, v in storage["per_image_epoch"].items()}})
        if args.report:
            write_json(args.report, {"bytes": storage, "images": n, "epochs": epochs, "stored_epochs": stored,
                                     "codec": cfg.codec, "topk": cfg.topk,
                                     **({} if agreement is None else {"teacher_agreement": agreement})})
        run.artifact(Path(args.out) / "meta.json", "condensed_set")  # the set's card
        run.dataset(args.out, f"condensed-ipc{p.ipc}", set_meta["set_id"], context="output")
    per = storage["per_image_epoch"]
    agreed = "" if agreement is None else f"teachers agree with the class on {100 * agreement:.1f}% of the views; "
    print(f"relabel: {n} images x {epochs} epochs ({stored} stored, {cfg.codec}"
          f"{f' top-{cfg.topk}' if cfg.topk else ''}) -> {args.out} ({agreed}{storage['images'] / 1e6:.3f} MB of "
          f"images, {storage['labels'] / 1e6:.3f} MB of labels, {storage['plan'] / 1e6:.3f} MB of plan, "
          f"{storage['container'] / 1e6:.3f} MB of container; labels {per['labels']:.2f} bytes per image per "
          f"epoch)")


if __name__ == "__main__":
    stage_main(main)
