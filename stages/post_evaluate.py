"""post_evaluate: train students from the condensed shards alone and report their test accuracy.

Under ``torchrun --nproc_per_node N`` (params ``launcher``) the ranks train each student together
with DistributedDataParallel, each on its share of every planned batch; rank 0 evaluates, writes the
metrics and keeps the checkpoint, which every rank resumes from.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Import the edc package next to this script (the one dvc.yaml hashes), also where DVC runs an
# experiment in a copy of the workspace (dvc exp run --queue / --temp) and an editable install
# would otherwise hand it the live workspace's code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edc import distributed
from edc.data import load_prepared, split_files
from edc.errors import ArtifactError
from edc.evaluate import Recipe, evaluate_students, variant_sets
from edc.io import write_curves, write_json
from edc.params import EvaluateParams, Params, load_params
from edc.plan import planned_epochs
from edc.resume import Checkpointer, fingerprint
from edc.runtime import resolve_device
from edc.seeding import derive_seed, trial_seed
from edc.shards import load_condensed
from edc.stage import parser, stage_main, stage_params
from edc.tracking import stage_run

PATHS = {  # --NAME: help (all required)
    "data": "prepared dataset directory (its test split)",
    "shards": "condensed set (condensed/shards)",
    "metrics": "accuracies, JSON (reports/metrics.json)",
    "curves": "directory for per-student training curves (CSV)",
}
OPTIONAL = {
    "accuracy": "directory of validation-accuracy curves (EMA and raw weights) for DVC plots",
}


def check_plan(args, p: Params, ds, data) -> None:
    """The set must come from this dataset, and its stored plan must be the one params.yaml asks for:
    the evaluation batch size and epoch count are the relabel plan's (the soft labels belong to those
    exact batches)."""
    if (ds.facts.name, ds.facts.num_classes) != (data.facts.name, data.facts.num_classes):
        raise ArtifactError(f"{args.shards}/meta.json: made from {ds.facts.name} ({ds.facts.num_classes} classes), "
                            f"but the test split is {data.facts.name} ({data.facts.num_classes} classes)")
    # The evaluation batch size and epoch count are the relabel plan's: a set planned otherwise
    # cannot serve them (the soft labels belong to those exact batches).
    want_epochs = planned_epochs(p.relabel.epochs, p.relabel.min_steps, ds.meta["num_images"],
                                 p.relabel.batch_size)
    for key, have, want, asked in (
            ("batch_size", ds.batch_size, p.relabel.batch_size, f"relabel.batch_size: {p.relabel.batch_size}"),
            ("epochs", ds.epochs, want_epochs, f"{want_epochs} epochs (relabel.epochs: {p.relabel.epochs}, "
                                               f"relabel.min_steps: {p.relabel.min_steps})")):
        if have != want:
            raise ArtifactError(f"{args.shards}: its stored plan has {key} {have}, but {args.params} asks for "
                                f"{asked}; rerun relabel (dvc repro) to plan for it")


def write_plots(args, cfg: EvaluateParams, curves: dict[str, list[dict]], has_val: bool) -> None:
    """Training curves per student and seed; the validation-accuracy curves (EMA and raw weights), one
    file per line of the DVC plot. No curve holds the test split: it is scored once, at the end."""
    fields = ["epoch", "train_loss"] + (["val_acc"] + (["raw_val_acc"] if cfg.ema else []) if has_val else [])
    write_curves(args.curves, curves, fields)
    # One file per line of the DVC plot (student, seed, EMA or raw weights); without a validation split
    # (dataset.val_size 0) the files hold their header only.
    if args.accuracy:
        acc = {}
        for name, rows in curves.items():
            scored = [r for r in rows if "val_acc" in r]
            acc[f"{name}-{'ema' if cfg.ema else 'model'}"] = [
                {"epoch": r["epoch"], "val_acc": r["val_acc"]} for r in scored]
            if cfg.ema:
                acc[f"{name}-raw"] = [{"epoch": r["epoch"], "val_acc": r["raw_val_acc"]} for r in scored]
        write_curves(args.accuracy, acc, ["epoch", "val_acc"])


def main(argv=None) -> None:
    args = parser("post_evaluate", __doc__, PATHS, OPTIONAL).parse_args(argv)
    p = load_params(args.params)
    cfg = p.evaluate
    device = resolve_device(p.device)
    world = distributed.init()
    with stage_run("post_evaluate", stage_params(p, "post_evaluate"), seed=p.seed, enabled=world.main) as run:
        data = load_prepared(args.data, p.workers)
        ds = load_condensed(args.shards, labels=cfg.labels)
        run.dataset(args.shards, f"condensed-ipc{ds.meta.get('ipc')}", ds.meta["set_id"], context="training")
        check_plan(args, p, ds, data)
        test = data.view("test")  # read batch by batch at each evaluation
        val = data.view("val") if data.has_val else None  # what recipes are chosen on (dataset.val_size)
        ckpt = Checkpointer(args.metrics, fingerprint("post_evaluate", stage_params(p, "post_evaluate"),
                                                      [args.shards, *split_files(args.data, "test"),
                                                       *split_files(args.data, "val")], code=__file__))
        seed = trial_seed(p.seed, p.trial)
        metrics, curves = evaluate_students(Recipe(cfg, p.zeta, device, p.bf16, world), ds, test, val,
                                            seed_for=lambda *k: derive_seed(seed, "evaluate", *k), ckpt=ckpt, run=run,
                                            variants=variant_sets(ds, cfg.variants), jobs=p.eval_jobs)
        if not world.main:
            return
        write_plots(args, cfg, curves, val is not None)
        write_json(args.metrics, metrics)
        ckpt.clear()
        run.artifact(args.metrics)
    for name, m in metrics.items():
        print(f"{name}: test accuracy {100 * m['acc_mean']:.2f} +- {100 * m['acc_std']:.2f}% over {cfg.seeds} seeds "
              f"({ds.labels} labels, {ds.epochs} epochs)")  # a set of hard labels trains on classes
        for variant, v in m.get("variants", {}).items():
            print(f"{name} ({variant}): test accuracy {100 * v['acc_mean']:.2f} +- {100 * v['acc_std']:.2f}%")


if __name__ == "__main__":
    stage_main(main)
