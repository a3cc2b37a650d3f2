"""train_observers: train every observer in params.observers.models on the prepared train split.

Under ``torchrun --nproc_per_node N`` (params ``launcher``) the ranks train each observer together
with DistributedDataParallel, each on its share of every batch; rank 0 writes the observers.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Import the edc package next to this script (the one dvc.yaml hashes), also where DVC runs an
# experiment in a copy of the workspace (dvc exp run --queue / --temp) and an editable install
# would otherwise hand it the live workspace's code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

from edc import distributed
from edc.data import load_prepared
from edc.io import atomic_dir, write_curves, write_json
from edc.observers import imagenet_observer, save_observer, train_observer
from edc.params import load_params
from edc.runtime import resolve_device
from edc.stage import parser, stage_main, stage_params
from edc.tracking import stage_run

PATHS = {  # --NAME: help (all required)
    "data": "prepared dataset directory",
    "out": "observers directory (models/observers)",
    "report": "test accuracies, JSON (reports/observers.json)",
    "plots": "directory for per-observer training curves (CSV)",
}


def main(argv=None) -> None:
    args = parser("train_observers", __doc__, PATHS).parse_args(argv)
    p = load_params(args.params)
    cfg = p.observers
    device = resolve_device(p.device)
    world = distributed.init()
    with stage_run("train_observers", stage_params(p, "train_observers"), seed=p.seed, enabled=world.main) as run:
        data = load_prepared(args.data, p.workers)
        train, test = data.view("train"), data.view("test")  # read batch by batch
        report, curves = {}, {}
        # Only rank 0 publishes; the other ranks train alongside it and write nothing.
        with (atomic_dir(args.out) if world.main else contextlib.nullcontext(None)) as tmp:
            for spec in cfg.models:
                if spec.weights == "imagenet":
                    if not world.main:
                        continue  # nothing to train
                    res = imagenet_observer(spec, data.facts, test, device)
                else:
                    res = train_observer(spec, cfg, data.facts, train, test, p.seed, device=device, bf16=p.bf16,
                                         world=world)
                if not world.main:
                    continue
                save_observer(Path(tmp), spec.name, res.model, {
                    "name": spec.name, "arch": spec.arch, "kwargs": dict(spec.kwargs),
                    "dataset": data.facts.to_dict(), "seed": p.seed,
                    "training": cfg.model_dump(exclude={"models"}) if spec.weights == "train" else "imagenet",
                    "test_acc": res.test_acc,
                })
                n_params = sum(t.numel() for t in res.model.parameters())
                report[spec.name] = {"arch": spec.arch, "test_acc": round(res.test_acc, 6), "params": n_params}
                curves[spec.name] = res.history
                for row in res.history:
                    run.metrics({f"{spec.name}.train_loss": row["train_loss"],
                                 f"{spec.name}.train_acc": row["train_acc"]}, step=row["epoch"])
                run.metrics({f"{spec.name}.test_acc": res.test_acc, f"{spec.name}.seconds": res.seconds})
                print(f"[{spec.name}] test_acc {res.test_acc:.4f} ({res.seconds:.0f} s)", flush=True)
        if world.main:
            write_curves(args.plots, curves, ["epoch", "train_loss", "train_acc", "lr"])
            write_json(args.report, report)
            run.artifact(args.report)


if __name__ == "__main__":
    stage_main(main)
