"""Image folders read on the fly (dataset.storage: files): throughput with DataLoader workers, and memory.

    python benchmarks/streaming.py [--images 4000] [--size 128] [--repeats 3]

Writes a scratch folder of random JPEGs (10 classes; train/ and val/), prepares it with both
storages, then for each of: arrays (memory-mapped), files with 0 workers (decoding in the stage's
process) and files with 2 workers, times a pass of collect_bn_stats with a ConvNet observer over
the train split. Each pass runs in a fresh process, which also reports its peak resident memory
against a process that loads the whole split into one tensor,
as stages did before streaming.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine_line  # noqa: E402

CHILD = r"""
import json, sys, time, torch
from edc.data import load_prepared
from edc.models import create_model
from edc.stats import collect_bn_stats
path, workers, mode, repeats = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.manual_seed(0)
data = load_prepared(path, workers)
f = data.facts
model = create_model("convnet", in_channels=f.channels, num_classes=f.num_classes, image_size=f.height,
                     width=8, depth=3, norm="batch").eval()
times = []
for _ in range(repeats):
    t = time.perf_counter()
    if mode == "whole":
        x, y = data.normalized("train")
        collect_bn_stats(model, x, y, f.num_classes, 100)
        del x
    else:
        collect_bn_stats(model, data.view("train"), None, f.num_classes, 100)
    times.append(time.perf_counter() - t)
# VmHWM: this process's peak resident set (ru_maxrss would include the parent's at fork)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": sorted(times)[len(times) // 2], "peak_mib": hwm / 1024}))
"""


def make_folder(root: Path, n: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    per_class = n // 10
    for split, count in (("train", per_class), ("val", max(1, per_class // 10))):
        for c in range(10):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(count):
                # smooth random images compress like photos (pure noise would not)
                small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
                Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR).save(d / f"{i}.jpg", quality=90)


def run(path: Path, workers: int, mode: str, repeats: int) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(path), str(workers), mode, str(repeats)], cwd=ROOT,
                       capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    print(machine_line(), flush=True)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4000, help="train images (10 classes)")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from edc.data import prepare
    from edc.params import DatasetParams

    with tempfile.TemporaryDirectory(prefix="edc-streaming-") as tmp:
        tmp = Path(tmp)
        make_folder(tmp / "jpegs", args.images, args.size)
        prepared = {}
        for storage in ("arrays", "files"):
            out = tmp / storage
            out.mkdir()
            prepare(DatasetParams(name="imagefolder", root=str(tmp / "jpegs"), image_size=args.size,
                                  storage=storage), 0, out, 2)
            prepared[storage] = out
        whole_mib = args.images * 3 * args.size * args.size * 4 / 2**20
        print(f"collect_stats pass over {args.images} train images of {args.size} px (ConvNet-8x3, batch 100), "
              f"median of {args.repeats}; a float32 copy of the split is {whole_mib:.0f} MiB")
        rows = [("arrays storage, whole split loaded first (before streaming)", prepared["arrays"], 0, "whole"),
                ("arrays storage, memory-mapped batches", prepared["arrays"], 0, "view"),
                ("files storage, 0 workers (decode in the stage)", prepared["files"], 0, "view"),
                ("files storage, 2 workers", prepared["files"], 2, "view")]
        for name, path, workers, mode in rows:
            r = run(path, workers, mode, args.repeats)
            extra = " (the stage's process; workers hold a batch each)" if workers else ""
            print(f"  {name:<62} {r['seconds']:7.2f} s  {args.images / r['seconds']:7.0f} img/s  "
                  f"peak RSS {r['peak_mib']:6.0f} MiB{extra}")


if __name__ == "__main__":
    main()
