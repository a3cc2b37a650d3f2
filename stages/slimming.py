"""slimming: data-free network slimming with the condensed set (the paper's Fig. 4).

A trained observer (``slimming.model``, default the first) is pruned to each of ``slimming.ratios``
by the network-slimming criterion (BatchNorm scale magnitude, whole channels) and by weight
magnitude, then recovered by distillation from the unpruned network on the condensed set alone
(its stored plan), and tested before and after. Off by default (``slimming.enabled``).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Import the edc package next to this script (the one dvc.yaml hashes), also where DVC runs an
# experiment in a copy of the workspace (dvc exp run --queue / --temp) and an editable install
# would otherwise hand it the live workspace's code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edc.io import write_csv, write_json
from edc.params import load_params, load_section
from edc.stage import parser, stage_main, stage_params

FIELDS = ["sparsity", "bn_before", "bn_after", "magnitude_before", "magnitude_after"]


def write_plot(path: str, rows: list[dict]) -> None:
    write_csv(path, rows, ["ratio", *FIELDS], digits=None)


PATHS = {  # --NAME: help (all required)
    "data": "prepared dataset directory (its test split)",
    "shards": "condensed set (condensed/shards)",
    "observers": "observers directory",
    "metrics": "accuracy against sparsity, JSON (reports/slimming.json)",
    "plot": "CSV for dvc plots (reports/plots/slimming.csv)",
}


def main(argv=None) -> None:
    args = parser("slimming", __doc__, PATHS).parse_args(argv)
    if not load_section(args.params, "slimming").enabled:  # off: its placeholders, without torch
        write_json(args.metrics, {"enabled": False})
        write_plot(args.plot, [])
        print("slimming: off (slimming.enabled: false); set it to true and dvc repro to run it")
        return
    p = load_params(args.params)
    cfg = p.slimming
    from edc.applications import prune, recover, sparsity
    from edc.data import load_prepared
    from edc.observers import load_observer
    from edc.runtime import configure_threads, place, resolve_device
    from edc.seeding import derive_seed
    from edc.shards import load_condensed
    from edc.tracking import stage_run
    from edc.training import accuracy

    configure_threads()  # stage_main(threads=False) left it to here: off, the stage never imports torch
    device = resolve_device(p.device)
    name = cfg.model or p.observers.models[0].name
    with stage_run("slimming", stage_params(p, "slimming"), seed=p.seed) as run:
        data = load_prepared(args.data, p.workers)
        test = data.view("test")
        teacher = place(load_observer(args.observers, name)[0], device).eval()
        full = accuracy(teacher, test)
        ds = load_condensed(args.shards)
        rows = {}
        for kind in cfg.criteria:
            for ratio in cfg.ratios:
                pruned, masks = prune(teacher, kind, ratio)
                before = accuracy(pruned, test)
                recover(pruned, teacher, masks, kind, ds, epochs=cfg.epochs, lr=cfg.lr,
                        temperature=p.evaluate.temperature, seed=derive_seed(p.seed, "slimming", kind, str(ratio)))
                after = accuracy(pruned, test)
                row = rows.setdefault(ratio, {"ratio": ratio})
                row.update({f"{kind}_before": round(before, 6), f"{kind}_after": round(after, 6),
                            f"{kind}_sparsity": round(sparsity(masks), 6), "sparsity": ratio})
                run.metrics({f"{kind}.before": before, f"{kind}.after": after}, step=round(100 * ratio))
                print(f"slimming {name} [{kind}] {100 * ratio:.0f}% pruned: test accuracy {100 * before:.2f}% -> "
                      f"{100 * after:.2f}% after recovery on the condensed set (unpruned {100 * full:.2f}%)",
                      flush=True)
        write_json(args.metrics, {"enabled": True, "model": name, "unpruned_acc": round(full, 6),
                                  "recovery_epochs": min(cfg.epochs, ds.epochs),
                                  "results": [rows[r] for r in sorted(rows)]})
        write_plot(args.plot, [rows[r] for r in sorted(rows)])
        run.artifact(args.metrics)


if __name__ == "__main__":
    stage_main(main, threads=False)
