"""``edc export``: a condensed set as a plain image folder any training script can read.

    OUT/<class name>/<id>.png   the images, lossless, one folder per class (torchvision ImageFolder)
    OUT/labels.csv              file, class index, class name, image id (the set's order)
    OUT/soft_logits.npy         float32 (N, K), row i for image id i: the stored teachers' logits
                                averaged over all of the image's planned views (edc.shards.mean_soft_logits);
                                absent for a set of hard labels (relabel.codec: hard)
    OUT/meta.json               the set's card, plus ``export`` (source, format)

The per-view soft labels of the plan stay in the set's shards; the folder carries their per-image
mean, which is what a script with its own augmentation can use.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from edc.errors import EdcError
from edc.io import atomic_dir, write_csv, write_json
from edc.shards import CondensedDataset, mean_soft_logits

FORMATS = ("imagefolder",)


def class_dir(name: str, index: int) -> str:
    """A folder name for a class: its name with path separators and odd characters replaced, and
    prefixed by its index so that the folders sort in class order (ImageFolder sorts them)."""
    safe = re.sub(r"[^A-Za-z0-9._ -]+", "_", name).strip() or "class"
    return f"{index:03d}_{safe}"


def export_imagefolder(src: str | Path, out: str | Path) -> Path:
    """Write the set at ``src`` (directory, URL or pipe:) as an image folder at ``out`` (must not exist
    or be empty); returns ``out``."""
    from PIL import Image

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise EdcError(f"edc export: {out} exists and is not empty; name a new folder")
    ds = CondensedDataset(src, labels="soft")
    names = list(ds.meta["class_names"])
    soft = None if ds.meta["codec"] == "hard" else mean_soft_logits(ds).numpy()  # a hard-label set has none
    with atomic_dir(out) as tmp:
        rows = []
        for i, (img, y) in enumerate(zip(ds.images_u8, ds.hard.tolist())):
            folder = class_dir(names[y], y)
            (tmp / folder).mkdir(exist_ok=True)
            arr = img.permute(1, 2, 0).numpy()
            rel = f"{folder}/{i:06d}.png"
            Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(tmp / rel, format="PNG")
            rows.append({"file": rel, "class_index": y, "class_name": names[y], "id": i})
        write_csv(tmp / "labels.csv", rows, ["file", "class_index", "class_name", "id"])
        if soft is not None:
            np.save(tmp / "soft_logits.npy", soft.astype(np.float32), allow_pickle=False)
        write_json(tmp / "meta.json", {**ds.meta, "export": {"from": str(src), "format": "imagefolder"}})
    return out
