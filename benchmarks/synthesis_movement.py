"""How far synthesis moves the images from their real initialisation: the diagnosis behind ``synth.lr``.

    python benchmarks/synthesis_movement.py [--ipc 1] [--lrs 0.05 0.1 0.25 0.5] [--iterations 300]

Needs the default pipeline's prepared data, observers and statistics (``dvc repro collect_stats``).
Starting from the same random real images (``init.method: real``, seed 0), it runs the synthesis of
params.yaml (observers, alpha, flatness, crops) at each learning rate and prints, on the saved
(uint8) images: the mean absolute pixel change in grey levels (0-255), the share of pixels that
moved by more than 32 levels, and each objective's value before and after (the matching loss
averaged over the observers under 8 draws of the synthesis crops). An image set that hardly moves
carries no more information than its starting real images, whatever its loss did.
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
    args = ap.parse_args()
    print(machine_line())
    p = load_params(ROOT / "params.yaml")
    data = load_prepared(ROOT / "data" / "prepared")
    facts = data.facts
    tx, ty = data.normalized("train")
    init = real_init(tx, ty, facts.num_classes, args.ipc, torch.Generator().manual_seed(0))
    init_u8 = to_uint8(init.images, facts)
    x0 = normalize(init_u8, facts)
    observers = [load_matched_observer(str(ROOT / "models/observers"), str(ROOT / "stats"), n, layers=p.synth.layers,
                                       aug=p.synth.aug) for n in p.synth.observers]
    batches = partition(init.labels, None)

    def objective(x: torch.Tensor) -> float:
        r = matching_report(x, init.labels, observers, p.alpha, batches, aug=p.synth.aug, draws=8)
        return sum(r.values()) / len(r)

    before = objective(x0)
    print(f"ipc {args.ipc}: {len(x0)} real images; {args.iterations} iterations; observers "
          f"{', '.join(p.synth.observers)}; matching loss of the real images {before:.4f}")
    print(f"{'synth.lr':>8} | {'mean |dpixel|':>13} {'moved >32':>9} | {'matching after':>14} {'ratio':>6} | {'s':>5}")
    for lr in args.lrs:
        cfg = p.synth.model_copy(update={"lr": lr, "iterations": args.iterations})
        t0 = time.perf_counter()
        out = synthesize(x0, init.labels, observers, cfg, p.alpha, pixel_bounds(facts), lambda b: 1000 + b)
        seconds = time.perf_counter() - t0
        out_u8 = to_uint8(out, facts)
        d = (out_u8.float() - init_u8.float()).abs()
        after = objective(normalize(out_u8, facts))
        print(f"{lr:>8} | {d.mean():>13.2f} {100 * (d > 32).float().mean():>8.1f}% | {after:>14.4f} "
              f"{after / before:>6.3f} | {seconds:>5.0f}", flush=True)


if __name__ == "__main__":
    main()
