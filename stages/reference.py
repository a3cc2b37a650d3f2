"""reference: each student trained on the whole train split with hard labels, under the evaluation recipe.

The full-data accuracy that hard-label recovery (HLR, docs/metrics.md) subtracts a set's hard-label
accuracy from. It reads no condensed set, ipc or trial, so one run serves every experiment evaluated
under the same recipe (DVC's run-cache restores it for the others). Off unless ``reference.enabled``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Import the edc package next to this script (the one dvc.yaml hashes), also where DVC runs an
# experiment in a copy of the workspace (dvc exp run --queue / --temp) and an editable install
# would otherwise hand it the live workspace's code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edc.io import write_json
from edc.params import load_params, load_section
from edc.stage import parser, stage_main, stage_params

PATHS = {  # --NAME: help (all required)
    "data": "prepared dataset directory (its train, validation and test splits)",
    "metrics": "full-data accuracies, JSON (reports/reference.json)",
}


def main(argv=None) -> None:
    args = parser("reference", __doc__, PATHS).parse_args(argv)
    if not load_section(args.params, "reference").enabled:  # off: its placeholder, without torch
        write_json(args.metrics, {"enabled": False})
        print("reference: off (reference.enabled: false); set it to true and dvc repro to run it (HLR needs it)")
        return
    p = load_params(args.params)
    from edc.data import load_prepared, split_files
    from edc.evaluate import FullTrainSet, Recipe, evaluate_students
    from edc.resume import Checkpointer, fingerprint
    from edc.runtime import configure_threads, resolve_device
    from edc.seeding import derive_seed
    from edc.tracking import stage_run

    configure_threads()  # stage_main(threads=False) left it to here: off, the stage never imports torch
    device = resolve_device(p.device)
    with stage_run("reference", stage_params(p, "reference"), seed=p.seed) as run:
        data = load_prepared(args.data, p.workers)
        train = FullTrainSet(data.view("train"), data.facts, p.relabel.batch_size, p.reference.epochs, p.relabel.aug,
                             p.seed)
        val = data.view("val") if data.has_val else None
        splits = [f for split in ("train", "test", "val") for f in split_files(args.data, split)]
        ckpt = Checkpointer(args.metrics, fingerprint("reference", stage_params(p, "reference"), splits,
                                                      code=__file__))
        # Hard labels, whatever evaluate.labels says: HLR compares hard-label accuracies.
        cfg = p.evaluate.model_copy(update={"labels": "hard", "variants": []})
        students, _ = evaluate_students(Recipe(cfg, p.zeta, device, p.bf16), train, data.view("test"), val,
                                        seed_for=lambda *k: derive_seed(p.seed, "reference", *k), ckpt=ckpt, run=run)
        write_json(args.metrics, {"enabled": True, "epochs": p.reference.epochs, "images": len(train.train),
                                  "students": students})
        ckpt.clear()
        run.artifact(args.metrics)
    for name, m in students.items():
        print(f"reference {name}: test accuracy {100 * m['acc_mean']:.2f} +- {100 * m['acc_std']:.2f}% "
              f"({p.reference.epochs} epochs on the {len(train.train)} train images, hard labels)")


if __name__ == "__main__":
    stage_main(main, threads=False)
