"""How far synthesis moves the images from their real initialisation: the diagnosis behind ``synth.lr``.

    python benchmarks/synthesis_movement.py [--ipc 1] [--lrs 0.05 0.1 0.25 0.5] [--iterations 300] [--ce 1.0 0.0]

Needs the default pipeline's prepared data, observers and statistics (``dvc repro collect_stats``).
Starting from the same random real images (``init.method: real``, seed 0), it runs the synthesis of
params.yaml (observers, alpha, flatness, crops) at each learning rate and prints, on the saved
(uint8) images: the mean absolute pixel change in grey levels (0-255), the share of pixels that
moved by more than 32 levels, and each objective's value before and after (the matching loss
averaged over the observers under 8 draws of the synthesis crops), and what the students will be
taught: the entropy of the teachers' soft labels (mean logits of the relabel teachers, temperature
``evaluate.temperature``) on 16 draws of the students' views (``relabel.aug``), and how often their
top class is the image's class. An image set that hardly moves carries no more information than its
starting real images, whatever its loss did; soft labels that become one-hot carry less.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine_line  # noqa: E402

from edc.data import load_prepared, normalize, pixel_bounds, to_uint8  # noqa: E402
from edc.init import real_init  # noqa: E402
from edc.params import load_params  # noqa: E402
from edc.synth import matching_report, partition, synthesize  # noqa: E402

sys.path.insert(0, str(ROOT / "stages"))
from synthesize import load_matched_observer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ipc", type=int, default=1)
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5])
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--ce", type=float, nargs="+", default=[1.0], help="synth.ce_weight values")
    args = ap.parse_args()
    print(machine_line())
    p = load_params(ROOT / "params.yaml")
    data = load_prepared(ROOT / "data" / "prepared")
    facts = data.facts
    tx, ty = data.normalized("train")
    init = real_init(tx, ty, facts.num_classes, args.ipc, torch.Generator().manual_seed(0))
    init_u8 = to_uint8(init.images, facts)
    x0 = normalize(init_u8, facts)
    observers = [load_matched_observer(str(ROOT / "models/observers"), str(ROOT / "stats"), n, cfg=p.synth)
                 for n in p.synth.observers]
    batches = partition(init.labels, None)

    from edc.observers import load_observer
    from edc.plan import augment, make_plan
    from edc.relabel import teacher_logits

    teachers = [load_observer(ROOT / "models/observers", n)[0].eval() for n in p.relabel.teachers]

    @torch.no_grad()
    def labels_taught(x: torch.Tensor) -> tuple[float, float]:
        ent, agree, n = 0.0, 0, 0
        for d in range(16):
            plan = make_plan(len(x), x.shape[2], x.shape[3], len(x), p.relabel.aug.scale_min, p.relabel.aug.flip,
                             cutmix=False, gen=torch.Generator().manual_seed(d))
            views = augment(x[plan.order], plan.crops, None)
            probs = torch.softmax(teacher_logits(teachers, views) / p.evaluate.temperature, 1)
            ent += float(-(probs * probs.clamp_min(1e-12).log()).sum(1).sum())
            agree += int((probs.argmax(1) == init.labels[plan.order]).sum())
            n += len(x)
        return ent / n, agree / n

    def objective(x: torch.Tensor) -> float:
        r = matching_report(x, init.labels, observers, p.alpha, batches, aug=p.synth.aug, draws=8)
        return sum(r.values()) / len(r)

    before = objective(x0)
    ent0, agree0 = labels_taught(x0)
    print(f"ipc {args.ipc}: {len(x0)} real images; {args.iterations} iterations; observers "
          f"{', '.join(p.synth.observers)}; matching loss of the real images {before:.4f}; their soft labels: "
          f"entropy {ent0:.3f} nats, top class = image class on {100 * agree0:.1f}% of the students' views")
    print(f"{'synth.lr':>8} {'ce':>4} | {'mean |dpixel|':>13} {'moved >32':>9} | {'matching after':>14} {'ratio':>6} |"
          f" {'label entropy':>13} {'agree':>6} | {'s':>5}")
    for lr, ce in [(lr, ce) for ce in args.ce for lr in args.lrs]:
        cfg = p.synth.model_copy(update={"lr": lr, "iterations": args.iterations, "ce_weight": ce})
        t0 = time.perf_counter()
        out = synthesize(x0, init.labels, observers, cfg, p.alpha, pixel_bounds(facts), seed_for=lambda b: 1000 + b)
        seconds = time.perf_counter() - t0
        out_u8 = to_uint8(out, facts)
        d = (out_u8.float() - init_u8.float()).abs()
        after = objective(normalize(out_u8, facts))
        ent, agree = labels_taught(normalize(out_u8, facts))
        print(f"{lr:>8} {ce:>4} | {d.mean():>13.2f} {100 * (d > 32).float().mean():>8.1f}% | {after:>14.4f} "
              f"{after / before:>6.3f} | {ent:>13.3f} {100 * agree:>5.1f}% | {seconds:>5.0f}", flush=True)


if __name__ == "__main__":
    main()
