"""synthesize: optimise the initial images with EDC's matching, cross-entropy and flatness terms."""

from __future__ import annotations

import sys
from pathlib import Path

# Import the edc package next to this script (the one dvc.yaml hashes), also where DVC runs an
# experiment in a copy of the workspace (dvc exp run --queue / --temp) and an editable install
# would otherwise hand it the live workspace's code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import csv

import torch

from edc import distributed
from edc.data import normalize, pixel_bounds, read_facts, to_uint8
from edc.errors import ArtifactError
from edc.imageset import read_imageset, save_comparison, write_imageset
from edc.io import atomic_dir, atomic_file, md5_file, write_json
from edc.observers import load_observer
from edc.params import load_params
from edc.resume import Checkpointer, fingerprint, run_units
from edc.runtime import derive_seed, place, resolve_device, seed_everything
from edc.stage import parser, stage_main, stage_params
from edc.stats import load_stats
from edc.synth import Observer, matching_report, partition, synthesize
from edc.tracking import stage_run

CURVE_FIELDS = ["step", "batch", "iteration", "observer", "ce", "bn", "flat", "total", "lr"]


def load_matched_observer(observers_dir: str, stats_dir: str, name: str, device=None, layers: str = "sum",
                          aug=None) -> Observer:
    """Observer ``name`` with its statistics; ``aug`` (the ``synth.aug`` section), when given, must be the
    augmentation the statistics were collected under, if any (``stats.augment``)."""
    model, _ = load_observer(observers_dir, name)
    if device is not None:
        model = place(model, device)
    stats, meta = load_stats(Path(stats_dir) / f"{name}.safetensors")
    weights = Path(observers_dir) / f"{name}.safetensors"
    if meta.get("observer_md5") != md5_file(weights):
        raise ArtifactError(f"{stats_dir}/{name}.safetensors: statistics were collected from another checkpoint "
                            f"than {weights}; rerun collect_stats")
    made_with = (meta.get("targets") or {}).get("aug")
    if aug is not None and made_with is not None and made_with != aug.model_dump():
        def fmt(d: dict) -> str:
            return ", ".join(f"{k}: {d[k]}" for k in sorted(d))

        raise ArtifactError(f"{stats_dir}/{name}.safetensors: targets collected under synth.aug {{{fmt(made_with)}}}, "
                            f"but synth.aug is {{{fmt(aug.model_dump())}}}; rerun collect_stats (dvc repro)")
    return Observer(name, model, stats, layers)


def main(argv=None) -> None:
    ap = parser("synthesize", __doc__)
    ap.add_argument("--data", required=True, help="prepared dataset directory (for its facts)")
    ap.add_argument("--init", required=True, help="initial image set (condensed/init)")
    ap.add_argument("--observers", required=True, help="observers directory")
    ap.add_argument("--stats", required=True, help="statistics directory")
    ap.add_argument("--out", required=True, help="synthesized image set (condensed/images)")
    ap.add_argument("--report", required=True, help="matching losses before/after, JSON")
    ap.add_argument("--curves", required=True, help="per-iteration losses, CSV")
    ap.add_argument("--grid", required=True, help="PNG: per class (named), the initial and the synthesized images")
    args = ap.parse_args(argv)
    p = load_params(args.params)
    cfg = p.synth
    world = distributed.init()
    with stage_run("synthesize", stage_params(p, "synthesize"), seed=p.seed, enabled=world.main) as run:
        facts = read_facts(args.data)
        init_u8, labels, init_meta = read_imageset(args.init)
        device = resolve_device(p.device)
        images = normalize(init_u8, facts).to(device)  # synthesis stays fp32 on any device
        ydev = labels.to(device)
        observers = [load_matched_observer(args.observers, args.stats, name, device, cfg.layers, cfg.aug)
                     for name in cfg.observers]
        seed_everything(derive_seed(p.seed, "synthesize"))
        batches = partition(labels, None if cfg.batch_size == "all" else cfg.batch_size)
        report_seed = derive_seed(p.seed, "synthesize", "report")

        def measure(imgs):
            return (matching_report(imgs, ydev, observers, p.alpha, batches, cfg.aug, seed=report_seed),
                    matching_report(imgs, ydev, observers, p.alpha, batches))

        rows = []

        def log(row: dict) -> None:
            rows.append(row)
            run.metrics({"ce": row["ce"], "bn": row["bn"], f"bn.{row['observer']}": row["bn"], "flat": row["flat"],
                         "total": row["total"]}, step=row["step"])

        seed_for = lambda b: derive_seed(p.seed, "synthesize", str(b))  # noqa: E731
        ckpt = Checkpointer(args.out, fingerprint("synthesize", stage_params(p, "synthesize"),
                                                  [args.init, args.stats, *(Path(args.observers) / f"{n}.safetensors"
                                                                            for n in cfg.observers)], code=__file__))
        if world.size > 1:
            # The batches are dealt out to the ranks; each finished batch is kept in the checkpoint
            # directory, so a rerun after an interruption, with any number of ranks, runs only the
            # batches without a file. Rank 0 merges them (a batch's result depends on its index only).
            def part_file(b: int) -> Path:
                return ckpt.dir / f"batch-{b:04d}.pt"

            def work(b: int) -> None:
                own_rows: list[dict] = []
                result = synthesize(images, ydev, observers, cfg, p.alpha, pixel_bounds(facts), seed_for,
                                    own_rows.append, only=[b])
                with atomic_file(part_file(b), "wb") as f:
                    torch.save({"images": result[batches[b]].cpu(), "rows": own_rows}, f)

            if not run_units(ckpt, world, range(len(batches)), lambda b: part_file(b).is_file(), work, "batches",
                             "synthesize"):
                return
            before, plain_before = measure(images)
            result = images.clone()
            merged: list[dict] = []
            for b in range(len(batches)):
                part = torch.load(part_file(b), weights_only=True)
                result[batches[b]] = part["images"].to(device)
                merged += part["rows"]
            for row in sorted(merged, key=lambda r: r["step"]):
                log(row)
        else:
            result = synthesize(images, ydev, observers, cfg, p.alpha, pixel_bounds(facts), seed_for, log, ckpt)
            before, plain_before = measure(images)  # after, so that the first iteration is not kept waiting
        out_u8 = to_uint8(result.cpu(), facts)
        # Measured on what is saved (the images rounded to pixels). "matching" is under the synthesis
        # augmentation, what the objective minimises; "plain" is on the un-augmented images, which the
        # crops never show the observers, so it need not fall.
        after, plain_after = measure(normalize(out_u8, facts).to(device))
        report = {name: {"matching_initial": round(before[name], 6), "matching_final": round(after[name], 6),
                         "ratio": round(after[name] / before[name], 6) if before[name] else None,
                         "plain_initial": round(plain_before[name], 6), "plain_final": round(plain_after[name], 6)}
                  for name in before}
        with atomic_dir(args.out) as tmp:
            write_imageset(tmp, out_u8, labels, {
                "alpha": p.alpha, "seed": p.seed, "params": cfg.model_dump(), "init": init_meta["method"],
                "dataset": facts.name, "ipc": init_meta["ipc"], "matching": report,
            })
        with atomic_file(args.curves, "w") as f:
            w = csv.DictWriter(f, fieldnames=CURVE_FIELDS)
            w.writeheader()
            w.writerows({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
        with atomic_file(args.grid, "wb") as f:
            save_comparison(f, init_u8, out_u8, labels, facts.class_names)
        write_json(args.report, report)
        ckpt.clear()
        for name, r in report.items():
            run.metrics({f"{key}.{name}": r[key] for key in ("matching_initial", "matching_final", "plain_initial",
                                                             "plain_final")})
            print(f"[{name}] matching loss {r['matching_initial']:.4f} -> {r['matching_final']:.4f} "
                  f"(un-augmented {r['plain_initial']:.4f} -> {r['plain_final']:.4f})")
        run.artifact(args.grid)
        run.artifact(args.report)
        run.artifact(Path(args.out) / "meta.json", "condensed_images")


if __name__ == "__main__":
    stage_main(main)
