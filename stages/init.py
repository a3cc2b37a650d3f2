"""init: the starting images of the condensed set (rded, real or noise), with their provenance."""

from __future__ import annotations

import sys
from pathlib import Path

# Import the edc package next to this script (the one dvc.yaml hashes), also where DVC runs an
# experiment in a copy of the workspace (dvc exp run --queue / --temp) and an editable install
# would otherwise hand it the live workspace's code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from edc.data import load_prepared, to_uint8
from edc.imageset import save_grid, write_imageset
from edc.init import noise_init, rded_init, real_init
from edc.io import atomic_dir, atomic_file
from edc.observers import load_observer
from edc.params import load_params
from edc.runtime import place, resolve_device
from edc.seeding import derive_seed, seed_everything, trial_meta, trial_seed
from edc.stage import parser, stage_main, stage_params
from edc.tracking import stage_run

PATHS = {  # --NAME: help (all required)
    "data": "prepared dataset directory",
    "observers": "observers directory",
    "out": "initial image set directory (condensed/init)",
    "grid": "PNG of the initial images, one row per class",
}


def main(argv=None) -> None:
    args = parser("init", __doc__, PATHS).parse_args(argv)
    p = load_params(args.params)
    cfg = p.init
    with stage_run("init", stage_params(p, "init"), seed=p.seed) as run:
        data = load_prepared(args.data, p.workers)
        k = data.facts.num_classes
        gen = seed_everything(derive_seed(trial_seed(p.seed, p.trial), "init"))
        if cfg.method == "noise":
            res = noise_init((data.facts.channels, data.facts.height, data.facts.width), k, p.ipc, gen)
        else:
            train = data.view("train")  # only the images drawn are read
            if cfg.method == "real":
                res = real_init(train, None, k, p.ipc, gen)
            else:
                device = resolve_device(p.device)
                models = [place(load_observer(args.observers, name)[0], device) for name in cfg.observers]
                res = rded_init(train, None, models, cfg, k=k, ipc=p.ipc, gen=gen)
        images = to_uint8(res.images, data.facts)
        with atomic_dir(args.out) as tmp:
            write_imageset(tmp, images, res.labels, {
                "method": cfg.method, "ipc": p.ipc, "seed": p.seed, **trial_meta(p.trial), "params": cfg.model_dump(),
                "dataset": data.facts.name, "index": res.index,
            })
        with atomic_file(args.grid, "wb") as f:
            save_grid(f, images, res.labels, k)
        run.artifact(args.grid)
        scores = [s for r in res.index for s in r["scores"]]
        if scores:
            run.metrics({"mean_crop_score": float(torch.tensor(scores).mean())})
    print(f"init ({cfg.method}): {len(images)} images, {p.ipc} per class -> {args.out}")


if __name__ == "__main__":
    stage_main(main)
