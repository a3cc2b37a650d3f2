"""prepare: read the source dataset, split it, measure its facts, write the prepared format."""

from __future__ import annotations

import sys
from pathlib import Path

# Import the edc package next to this script (the one dvc.yaml hashes), also where DVC runs an
# experiment in a copy of the workspace (dvc exp run --queue / --temp) and an editable install
# would otherwise hand it the live workspace's code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edc.data import prepare
from edc.io import atomic_dir
from edc.params import load_params
from edc.stage import parser, stage_main, stage_params
from edc.tracking import stage_run

PATHS = {  # --NAME: help (all required)
    "out": "prepared dataset directory (data/prepared)",
}


def main(argv=None) -> None:
    args = parser("prepare", __doc__, PATHS).parse_args(argv)
    p = load_params(args.params)
    with stage_run("prepare", stage_params(p, "prepare"), seed=p.seed) as run:
        with atomic_dir(args.out) as tmp:
            facts = prepare(p.dataset, p.seed, tmp, p.workers)
        run.json(facts.to_dict(), "facts.json")
        run.metrics({"train_images": sum(facts.counts["train"]), "test_images": sum(facts.counts["test"]),
                     "num_classes": facts.num_classes})
    print(f"prepared {facts.name}: {sum(facts.counts['train'])} train / {sum(facts.counts['test'])} test images, "
          f"{facts.num_classes} classes, {facts.channels}x{facts.height}x{facts.width} -> {args.out}")


if __name__ == "__main__":
    stage_main(main)
