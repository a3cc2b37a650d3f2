"""continual: class-incremental learning from the condensed set (the paper's Fig. 4, DM's protocol).

Classes arrive in ``continual.steps`` groups in a seeded order; at each step a student is trained
from the condensed images of the classes seen so far (soft labels restricted to them, and hard
labels) with the post-evaluation recipe, and tested on the test images of those classes. Off by
default (``continual.enabled``): then it writes a report saying so, without importing torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Import the edc package next to this script (the one dvc.yaml hashes), also where DVC runs an
# experiment in a copy of the workspace (dvc exp run --queue / --temp) and an editable install
# would otherwise hand it the live workspace's code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edc.io import write_csv, write_json
from edc.params import Params, load_params, load_section
from edc.stage import parser, stage_main, stage_params

PATHS = {  # --NAME: help (all required)
    "data": "prepared dataset directory (its test split)",
    "shards": "condensed set (condensed/shards)",
    "metrics": "accuracy per step, JSON (reports/continual.json)",
    "plot": "CSV: accuracy against classes seen (reports/plots/continual.csv)",
}


def run_steps(args, p: Params, groups: list[list[int]], test, spec, *, device, run) -> tuple[list[dict], list[dict]]:
    """For each label kind and step: ``continual.seeds`` students trained on the classes seen so far,
    tested on their test images. Returns (one entry per kind and step, plot rows)."""
    from edc.applications import SeenClasses, seen_test
    from edc.evaluate import Recipe, summarize, train_student
    from edc.seeding import derive_seed
    from edc.shards import load_condensed

    cfg = p.continual
    steps, rows = [], []
    for kind in cfg.labels:
        ds = load_condensed(args.shards, labels=kind)
        for t in range(cfg.steps):
            seen = [c for g in groups[:t + 1] for c in g]
            accs = []
            for s in range(cfg.seeds):
                res = train_student(spec, Recipe(p.evaluate, p.zeta, device, p.bf16), SeenClasses(ds, seen),
                                    seen_test(test, seen), derive_seed(p.seed, "continual", kind, str(t), str(s)))
                accs.append(res.acc)
            mean, std = summarize(accs)
            steps.append({"labels": kind, "step": t + 1, "classes_seen": len(seen), "classes": seen,
                          "acc_mean": round(mean, 6), "acc_std": round(std, 6)})
            rows.append({"classes_seen": len(seen), f"{kind}_acc": round(mean, 6)})
            run.metrics({f"{kind}.acc_mean": mean, f"{kind}.acc_std": std}, step=len(seen))
            print(f"continual [{kind} labels] step {t + 1}/{cfg.steps}: {len(seen)} classes seen, test accuracy "
                  f"{100 * mean:.2f} +- {100 * std:.2f}% ({spec.name}, {cfg.seeds} seeds)", flush=True)
    return steps, rows


def main(argv=None) -> None:
    args = parser("continual", __doc__, PATHS).parse_args(argv)
    if not load_section(args.params, "continual").enabled:  # off: its placeholders, without torch
        write_json(args.metrics, {"enabled": False})
        write_curves_file(args.plot, [])
        print("continual: off (continual.enabled: false); set it to true and dvc repro to run it")
        return
    p = load_params(args.params)
    cfg = p.continual
    from edc.applications import class_groups, class_order
    from edc.data import load_prepared
    from edc.runtime import configure_threads, resolve_device
    from edc.seeding import derive_seed
    from edc.tracking import stage_run

    configure_threads()  # stage_main(threads=False) left it to here: off, the stage never imports torch
    device = resolve_device(p.device)
    with stage_run("continual", stage_params(p, "continual"), seed=p.seed) as run:
        data = load_prepared(args.data, p.workers)
        k = data.facts.num_classes
        order = class_order(k, derive_seed(p.seed, "continual"))
        groups = class_groups(order, cfg.steps)
        test = data.normalized("test")
        spec = p.evaluate.students[0]
        steps, rows = run_steps(args, p, groups, test, spec, device=device, run=run)
        merged: dict[int, dict] = {}
        for r in rows:
            merged.setdefault(r["classes_seen"], {"classes_seen": r["classes_seen"]}).update(r)
        write_json(args.metrics, {"enabled": True, "student": spec.name, "class_order": order, "steps": steps,
                                  **{f"{kind}_final_acc": next(s["acc_mean"] for s in reversed(steps)
                                                               if s["labels"] == kind) for kind in cfg.labels}})
        write_curves_file(args.plot, list(merged.values()), [f"{k}_acc" for k in cfg.labels])
        run.artifact(args.metrics)


def write_curves_file(path: str, rows: list[dict], fields: list[str] | None = None) -> None:
    """One CSV (classes_seen, <labels>_acc ...) for `dvc plots`; a header only when the stage is off."""
    write_csv(path, rows, ["classes_seen", *(fields or ["soft_acc", "hard_acc"])], digits=None)


if __name__ == "__main__":
    stage_main(main, threads=False)
