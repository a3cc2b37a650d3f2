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
from edc.evaluate import StudentResult, summarize, train_student
from edc.io import write_curves, write_json
from edc.params import load_params
from edc.plan import planned_epochs
from edc.resume import Checkpointer, fingerprint
from edc.runtime import derive_seed, resolve_device
from edc.shards import load_condensed
from edc.stage import parser, stage_main, stage_params
from edc.tracking import stage_run


def main(argv=None) -> None:
    ap = parser("post_evaluate", __doc__)
    ap.add_argument("--data", required=True, help="prepared dataset directory (its test split)")
    ap.add_argument("--shards", required=True, help="condensed set (condensed/shards)")
    ap.add_argument("--metrics", required=True, help="accuracies, JSON (reports/metrics.json)")
    ap.add_argument("--curves", required=True, help="directory for per-student training curves (CSV)")
    ap.add_argument("--accuracy", help="directory of test-accuracy curves (EMA and raw weights) for DVC plots")
    args = ap.parse_args(argv)
    p = load_params(args.params)
    cfg = p.evaluate
    device = resolve_device(p.device)
    world = distributed.init()
    with stage_run("post_evaluate", stage_params(p, "post_evaluate"), seed=p.seed, enabled=world.main) as run:
        data = load_prepared(args.data, p.workers)
        ds = load_condensed(args.shards, labels=cfg.labels)
        run.dataset(args.shards, f"condensed-ipc{ds.meta.get('ipc')}", ds.meta["set_id"], context="training")
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
        test = data.view("test")  # read batch by batch at each evaluation
        val = data.view("val") if data.has_val else None  # what recipes are chosen on (dataset.val_size)
        ckpt = Checkpointer(args.metrics, fingerprint("post_evaluate", stage_params(p, "post_evaluate"),
                                                      [args.shards, *split_files(args.data, "test"),
                                                       *split_files(args.data, "val")], code=__file__))
        # Rank 0 looks first (it discards a checkpoint of other inputs); then the others read the same one.
        state = ckpt.load() if world.main else None
        world.barrier()
        if not world.main:
            state = ckpt.load()
        state = state or {"done": {}, "current": None}
        if world.main and (state["done"] or state["current"]):
            print(f"post_evaluate: resuming ({len(state['done'])} students/seeds finished; checkpoint in "
                  f"{ckpt.dir})", flush=True)
        metrics, curves = {}, {}
        for spec in cfg.students:
            accs, raws, vals, raw_vals = [], [], [], []
            for s in range(cfg.seeds):
                key = f"{spec.name}/{s}"

                def on_epoch(snapshot, key=key):
                    if world.main:
                        ckpt.maybe_save(lambda: {"done": state["done"], "current": {"key": key, **snapshot()}})

                # One nested MLflow run per student and seed: its curves and final accuracies.
                with run.child(f"{spec.name} seed {s}", {"edc.student": spec.name, "edc.seed": str(s)}) as seed_run:
                    if key in state["done"]:
                        res = StudentResult(**state["done"][key])
                    else:
                        current = state["current"] if (state["current"] or {}).get("key") == key else None
                        res = train_student(spec, cfg, p.zeta, ds, test,
                                            derive_seed(p.seed, "evaluate", spec.name, str(s)),
                                            lambda row, r=seed_run: r.metrics(
                                                {k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"]),
                                            current, on_epoch, device, p.bf16, world, val)
                        state["done"][key] = {"acc": res.acc, "raw_acc": res.raw_acc, "curve": res.curve,
                                              "seconds": res.seconds, "val_acc": res.val_acc,
                                              "raw_val_acc": res.raw_val_acc}
                        state["current"] = None
                        if world.main:
                            ckpt.maybe_save(lambda: state)
                    seed_run.metrics({"final_acc": res.acc, "raw_acc": res.raw_acc, "seconds": res.seconds,
                                      **({"val_acc": res.val_acc} if res.val_acc is not None else {})})
                if not world.main:
                    continue
                accs.append(res.acc)
                raws.append(res.raw_acc)
                if res.val_acc is not None:
                    vals.append(res.val_acc)
                    raw_vals.append(res.raw_val_acc)
                curves[f"{spec.name}-seed{s}"] = res.curve
                on_val = f", validation {100 * res.val_acc:.2f}%" if res.val_acc is not None else ""
                print(f"[{spec.name}] seed {s}: test accuracy {100 * res.acc:.2f}% (raw weights "
                      f"{100 * res.raw_acc:.2f}%{on_val}, {res.seconds:.0f} s)", flush=True)
            if not world.main:
                continue
            mean, std = summarize(accs)
            metrics[spec.name] = {"acc_mean": round(mean, 6), "acc_std": round(std, 6),
                                  "raw_acc_mean": round(summarize(raws)[0], 6),
                                  "seeds": {str(s): round(a, 6) for s, a in enumerate(accs)}}
            run.metrics({f"{spec.name}.acc_mean": mean, f"{spec.name}.acc_std": std})
            if vals:
                v_mean, v_std = summarize(vals)
                metrics[spec.name].update({"val_acc_mean": round(v_mean, 6), "val_acc_std": round(v_std, 6),
                                           "raw_val_acc_mean": round(summarize(raw_vals)[0], 6)})
                run.metrics({f"{spec.name}.val_acc_mean": v_mean, f"{spec.name}.val_acc_std": v_std})
        if not world.main:
            return
        fields = ["epoch", "train_loss", "test_acc"] + (["raw_test_acc"] if cfg.ema else []) + \
            (["val_acc"] if val is not None else [])
        write_curves(args.curves, curves, fields)
        if args.accuracy:  # one file per line of the DVC plot: student, seed, EMA or raw weights
            acc = {}
            for name, rows in curves.items():
                tested = [r for r in rows if "test_acc" in r]
                acc[f"{name}-{'ema' if cfg.ema else 'model'}"] = [
                    {"epoch": r["epoch"], "test_acc": r["test_acc"]} for r in tested]
                if cfg.ema:
                    acc[f"{name}-raw"] = [{"epoch": r["epoch"], "test_acc": r["raw_test_acc"]} for r in tested]
            write_curves(args.accuracy, acc, ["epoch", "test_acc"])
        write_json(args.metrics, metrics)
        ckpt.clear()
        run.artifact(args.metrics)
    for name, m in metrics.items():
        print(f"{name}: test accuracy {100 * m['acc_mean']:.2f} +- {100 * m['acc_std']:.2f}% over {cfg.seeds} seeds "
              f"({cfg.labels} labels, {ds.epochs} epochs)")


if __name__ == "__main__":
    stage_main(main)
