"""Where the matching loss puts real data: the diagnosis behind ``stats.augment`` and ``synth.layers``.

    python benchmarks/synthesis_targets.py [--per-class 20] [--draws 4]

Needs the default pipeline's prepared data and observers (``dvc repro train_observers``). For each
observer it prints the matching loss (alpha 0.5) of real train images, ``--per-class`` per class,
in three settings, averaged over 4 draws of the synthesis crops (``synth.aug`` of params.yaml):

- ``plain/plain``: un-augmented images against statistics of un-augmented images (the old targets);
- ``crops/plain``: the crops synthesis shows the observer against those same targets: what the old
  objective asked real images to pay;
- ``crops/crops``: the crops against statistics measured on crops (``stats.augment: true``).

and, for each, the loss summed over the observer's BatchNorm layers and averaged over them. If real
data under crops scores far above its un-augmented loss, the old objective's minimum was not at data
that looks real: synthesis spent its steps making crops look like uncropped images. The sums also
show how much one observer outweighs the others in the shared Adam state when the layers are summed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine_line  # noqa: E402

from edc.data import load_prepared  # noqa: E402
from edc.init import real_init  # noqa: E402
from edc.observers import load_observer, observer_names  # noqa: E402
from edc.params import load_params  # noqa: E402
from edc.stats import collect_bn_stats  # noqa: E402
from edc.synth import Observer, partition  # noqa: E402
from edc.synth_views import apply_crop_flip, sample_crop_flip  # noqa: E402


@torch.no_grad()
def loss(obs: Observer, x: torch.Tensor, y: torch.Tensor, aug, draws: int) -> float:
    gen = torch.Generator().manual_seed(0)
    total = 0.0
    for _ in range(draws if aug is not None else 1):
        xa = apply_crop_flip(x, sample_crop_flip(len(x), aug.scale_min, aug.flip, gen)) if aug is not None else x
        _, moments = obs.forward(xa)
        total += float(obs.matching(moments, y, 0.5))
    return total / (draws if aug is not None else 1)


def main() -> None:
    print(machine_line(), flush=True)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--draws", type=int, default=4, help="crop draws per image, for the crop targets and the loss")
    args = ap.parse_args()
    torch.manual_seed(0)
    p = load_params(ROOT / "params.yaml")
    data = load_prepared(ROOT / "data" / "prepared")
    tx, ty = data.normalized("train")
    k = data.facts.num_classes
    aug = p.synth.aug.model_copy(update={"kind": "crop"})
    real = real_init(tx, ty, k, args.per_class, torch.Generator().manual_seed(1))
    order = partition(real.labels, None)[0]
    x, y = real.images[order], real.labels[order]
    print(f"real train images: {len(x)} ({args.per_class} per class); synth.aug {vars(aug)}; alpha 0.5")
    print(f"{'observer':<14} {'layers':>6} | {'plain/plain':>12} {'crops/plain':>12} {'crops/crops':>12} |"
          f" {'per layer: plain/plain':>22} {'crops/plain':>12} {'crops/crops':>12}")
    for name in observer_names(ROOT / "models" / "observers"):
        model, _ = load_observer(ROOT / "models" / "observers", name)
        plain = collect_bn_stats(model, tx, ty, k, batch_size=500, desc=name)
        crops = collect_bn_stats(model, tx, ty, k, batch_size=500, desc=name, aug=aug, draws=args.draws, seed=2)
        row = []
        for layers in ("sum", "mean"):
            o_plain = Observer(name, load_observer(ROOT / "models" / "observers", name)[0], plain, layers=layers)
            o_crops = Observer(name, load_observer(ROOT / "models" / "observers", name)[0], crops, layers=layers)
            row += [loss(o_plain, x, y, None, 1), loss(o_plain, x, y, aug, args.draws),
                    loss(o_crops, x, y, aug, args.draws)]
        print(f"{name:<14} {len(plain):>6} | {row[0]:>12.3f} {row[1]:>12.3f} {row[2]:>12.3f} |"
              f" {row[3]:>22.3f} {row[4]:>12.3f} {row[5]:>12.3f}", flush=True)


if __name__ == "__main__":
    main()
