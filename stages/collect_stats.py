"""collect_stats: per-class and global BatchNorm input statistics of every observer, one pass each."""

from __future__ import annotations

import sys
from pathlib import Path

# Import the edc package next to this script (the one dvc.yaml hashes), also where DVC runs an
# experiment in a copy of the workspace (dvc exp run --queue / --temp) and an editable install
# would otherwise hand it the live workspace's code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edc.data import load_prepared
from edc.io import atomic_dir, md5_file, write_json
from edc.observers import load_observer, observer_names
from edc.params import load_params
from edc.runtime import place, resolve_device
from edc.seeding import derive_seed
from edc.stage import parser, stage_main, stage_params
from edc.stats import bn_layers, collect_bn_stats, save_stats
from edc.synth_views import view_record
from edc.tracking import stage_run

PATHS = {  # --NAME: help (all required)
    "data": "prepared dataset directory",
    "observers": "observers directory",
    "out": "statistics directory (stats/), one .safetensors per observer",
    "report": "summary JSON (reports/stats.json)",
}


def main(argv=None) -> None:
    args = parser("collect_stats", __doc__, PATHS).parse_args(argv)
    p = load_params(args.params)
    device = resolve_device(p.device)
    aug = p.synth.aug if p.stats.augment else None
    targets = {"augment": p.stats.augment, "draws": p.stats.draws if aug else 1,
               "aug": view_record(aug) if aug else None}
    with stage_run("collect_stats", stage_params(p, "collect_stats"), seed=p.seed) as run:
        data = load_prepared(args.data, p.workers)
        train = data.view("train")  # read batch by batch (memory-mapped arrays or decoded files)
        report = {}
        with atomic_dir(args.out) as tmp:
            for name in observer_names(args.observers):
                model, spec = load_observer(args.observers, name)
                model = place(model, device)
                if not bn_layers(model):  # e.g. AlexNet: a teacher for soft labels, nothing to match
                    print(f"[{name}] no BatchNorm layers: no statistics (usable in relabel.teachers, not in "
                          "synth.observers)", flush=True)
                    report[name] = {"layers": 0, "channels": 0, "running_mean_gap": 0.0}
                    continue
                stats = collect_bn_stats(model, train, None, data.facts.num_classes, batch_size=p.stats.batch_size,
                                         desc=name, aug=aug, draws=p.stats.draws,
                                         seed=derive_seed(p.seed, "collect_stats", name))
                save_stats(Path(tmp) / f"{name}.safetensors", stats, {
                    "observer": name, "arch": spec["arch"], "num_classes": data.facts.num_classes, "targets": targets,
                    "images": len(train), "observer_md5": md5_file(Path(args.observers) / f"{name}.safetensors"),
                })
                # How far the observer's running BN estimates are from the exact statistics: a check
                # that the observer and the data agree (large values mean a wrong dataset or observer).
                bns = dict(model.named_modules())
                gap = max(float(((bns[layer].running_mean.double().cpu() - s.mean).abs()
                                 / s.var.sqrt().clamp_min(1e-6)).mean()) for layer, s in stats.items())
                report[name] = {"layers": len(stats), "channels": sum(len(s.mean) for s in stats.values()),
                                "running_mean_gap": round(gap, 6)}
                run.metrics({f"{name}.layers": len(stats), f"{name}.running_mean_gap": gap})
                print(f"[{name}] {len(stats)} BatchNorm layers, running-mean gap {gap:.3f} std", flush=True)
        write_json(args.report, report)
        run.artifact(args.report)


if __name__ == "__main__":
    stage_main(main)
