"""synthesize: optimise the initial images with EDC's matching, cross-entropy and flatness terms."""

from __future__ import annotations

import sys
from pathlib import Path

# Import the edc package next to this script (the one dvc.yaml hashes), also where DVC runs an
# experiment in a copy of the workspace (dvc exp run --queue / --temp) and an editable install
# would otherwise hand it the live workspace's code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edc import distributed
from edc.data import normalize, pixel_bounds, read_facts, to_uint8
from edc.errors import ArtifactError
from edc.imageset import read_imageset, save_comparison, write_imageset
from edc.io import atomic_dir, atomic_file, md5_file, write_csv, write_json
from edc.observers import load_observer
from edc.params import SynthParams, load_params
from edc.resume import Checkpointer, fingerprint
from edc.runtime import place, resolve_device
from edc.seeding import derive_seed, seed_everything, trial_meta, trial_seed
from edc.stage import parser, stage_main, stage_params
from edc.stats import load_stats
from edc.synth import Observer, before_after, synthesize_set
from edc.synth_views import view_record
from edc.tracking import stage_run

CURVE_FIELDS = ["step", "batch", "iteration", "observer", "ce", "bn", "flat", "total", "lr"]


def load_matched_observer(observers_dir: str, stats_dir: str, name: str, device=None,
                          cfg: SynthParams | None = None) -> Observer:
    """Observer ``name`` with its statistics, matched as the ``synth`` section ``cfg`` says (``layers``,
    ``class_var``; without it: summed, pooled); ``cfg.aug`` must be the augmentation the statistics were
    collected under, if any (``stats.augment``)."""
    aug = cfg.aug if cfg is not None else None
    model, _ = load_observer(observers_dir, name)
    if device is not None:
        model = place(model, device)
    stats, meta = load_stats(Path(stats_dir) / f"{name}.safetensors")
    weights = Path(observers_dir) / f"{name}.safetensors"
    if meta.get("observer_md5") != md5_file(weights):
        raise ArtifactError(f"{stats_dir}/{name}.safetensors: statistics were collected from another checkpoint "
                            f"than {weights}; rerun collect_stats")
    made_with = (meta.get("targets") or {}).get("aug")
    if aug is not None and made_with is not None and made_with != view_record(aug):
        def fmt(d: dict) -> str:
            return ", ".join(f"{k}: {d[k]}" for k in sorted(d))

        raise ArtifactError(f"{stats_dir}/{name}.safetensors: targets collected under synth.aug {{{fmt(made_with)}}}, "
                            f"but synth.aug is {{{fmt(view_record(aug))}}}; rerun collect_stats (dvc repro)")
    if cfg is None:
        return Observer(name, model, stats)
    return Observer(name, model, stats, layers=cfg.layers, class_var=cfg.class_var,
                    first_layer_weight=cfg.first_layer_weight, targets=cfg.targets)


PATHS = {  # --NAME: help (all required)
    "data": "prepared dataset directory (for its facts)",
    "init": "initial image set (condensed/init)",
    "observers": "observers directory",
    "stats": "statistics directory",
    "out": "synthesized image set (condensed/images)",
    "report": "matching losses before/after, JSON",
    "curves": "per-iteration losses, CSV",
    "grid": "PNG: per class (named), the initial and the synthesized images",
}


def write_curve(path: str, rows: list[dict]) -> None:
    """Per-iteration losses, CSV (a DVC plot)."""
    write_csv(path, rows, CURVE_FIELDS)


def log_report(run, report: dict) -> None:
    """The matching losses before and after, per observer: to MLflow and the log."""
    for name, r in report.items():
        run.metrics({f"{key}.{name}": r[key] for key in ("matching_initial", "matching_final", "plain_initial",
                                                         "plain_final")})
        print(f"[{name}] matching loss {r['matching_initial']:.4f} -> {r['matching_final']:.4f} "
              f"(un-augmented {r['plain_initial']:.4f} -> {r['plain_final']:.4f})")


def iteration_logger(run, rows: list[dict]):
    """A function that keeps each iteration's row (for the loss curve) and logs its losses to MLflow."""
    def log(row: dict) -> None:
        rows.append(row)
        run.metrics({"ce": row["ce"], "bn": row["bn"], f"bn.{row['observer']}": row["bn"], "flat": row["flat"],
                     "total": row["total"]}, step=row["step"])
    return log


def main(argv=None) -> None:
    args = parser("synthesize", __doc__, PATHS).parse_args(argv)
    p = load_params(args.params)
    cfg = p.synth
    world = distributed.init()
    with stage_run("synthesize", stage_params(p, "synthesize"), seed=p.seed, enabled=world.main) as run:
        facts = read_facts(args.data)
        init_u8, labels, init_meta = read_imageset(args.init)
        device = resolve_device(p.device)
        images = normalize(init_u8, facts).to(device)  # synthesis stays fp32 on any device
        ydev = labels.to(device)
        observers = [load_matched_observer(args.observers, args.stats, name, device, cfg) for name in cfg.observers]
        seed = trial_seed(p.seed, p.trial)
        seed_everything(derive_seed(seed, "synthesize"))
        rows: list[dict] = []
        log = iteration_logger(run, rows)
        ckpt = Checkpointer(args.out, fingerprint("synthesize", stage_params(p, "synthesize"),
                                                  [args.init, args.stats, *(Path(args.observers) / f"{n}.safetensors"
                                                                            for n in cfg.observers)], code=__file__))
        result = synthesize_set(images, ydev, observers, cfg, p.alpha, pixel_bounds(facts),
                                seed_for=lambda b: derive_seed(seed, "synthesize", str(b)), world=world, ckpt=ckpt,
                                log=log)
        if result is None:  # ranks other than 0 under torchrun
            return
        out_u8 = to_uint8(result.cpu(), facts)
        # Measured on what is saved (the images rounded to pixels), after the iterations so that the
        # first one is not kept waiting.
        report = before_after(images, normalize(out_u8, facts).to(device), ydev, observers, p.alpha, cfg,
                              seed=derive_seed(seed, "synthesize", "report"))
        with atomic_dir(args.out) as tmp:
            write_imageset(tmp, out_u8, labels, {
                "alpha": p.alpha, "seed": p.seed, **trial_meta(p.trial), "params": cfg.model_dump(),
                "init": init_meta["method"],
                "dataset": facts.name, "ipc": init_meta["ipc"], "matching": report,
            })
        write_curve(args.curves, rows)
        with atomic_file(args.grid, "wb") as f:
            save_comparison(f, init_u8, out_u8, labels, facts.class_names)
        write_json(args.report, report)
        ckpt.clear()
        log_report(run, report)
        run.artifact(args.grid)
        run.artifact(args.report)
        run.artifact(Path(args.out) / "meta.json", "condensed_images")


if __name__ == "__main__":
    stage_main(main)
