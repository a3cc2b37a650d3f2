"""A second 28x28, 10-class dataset to check that a recipe is not tuned for MNIST: a 5,000-image
sample of Fashion-MNIST, written as an ``npz`` the pipeline reads (``dataset.name: npz``).

    apt-get install dataset-fashion-mnist        # Debian's package: /usr/share/datasets/fashion-mnist
    python benchmarks/fashion_mnist.py --out /tmp/fmnist5k.npz
    edc exp preset edc --ipc 1 -S dataset.name=npz -S dataset.root=/tmp/fmnist5k.npz

The sample is drawn from the 60,000 training images with a seeded permutation (seed 0), so it has
the default data's size: the pipeline then carves its own test (1,000) and validation (500) splits
from it, as it does for MNIST-5k. Nothing is downloaded: the images come from the package's
``*-idx3-ubyte.gz`` files (the format MNIST is published in).
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip): a big-endian magic number whose last byte is the number of dimensions,
    the dimensions as 32-bit integers, then unsigned bytes."""
    raw = gzip.open(path).read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    files = [args.source / f for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")]
    for f in files:
        if not f.is_file():
            raise SystemExit(f"{f}: not found; install Debian's dataset-fashion-mnist or pass --source")
    x, y = (read_idx(f) for f in files)
    idx = np.random.default_rng(args.seed).permutation(len(x))[: args.images]
    np.savez(args.out, x_train=x[idx], y_train=y[idx].astype(np.int64), class_names=np.array(CLASSES))
    print(f"{args.out}: {len(idx)} images, per class {np.bincount(y[idx], minlength=10).tolist()}")


if __name__ == "__main__":
    main()
