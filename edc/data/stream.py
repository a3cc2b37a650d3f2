"""Image folders read on the fly (``dataset.storage: files``): prepare lists the files and measures the
facts in one streamed pass; later stages decode batches in a DataLoader with worker processes.

Nothing here holds more than a few batches of images: the statistics pass, RDED scoring and test
evaluation of an ImageNet-sized folder need memory for the batches in flight, not for the dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from edc.data.prepared import FORMAT, DatasetFacts, channel_moments, pixel_sums
from edc.data.sources import folder_files, imagefolder_layout, load_image, stratified_split
from edc.errors import DataError
from edc.io import write_json
from edc.progress import progress
from edc.seeding import derive_seed

if TYPE_CHECKING:  # annotations only: the data package imports no configuration code
    from edc.params import DatasetParams


class ImageFiles(Dataset):
    """Item ``i``: (uint8 (C, H, W) image of ``files[order[i]]``, position ``i``, error text or '').

    A file that cannot be decoded yields a blank image and its error, so that the main process
    raises one clear DataError naming the file (an exception inside a worker would arrive wrapped
    in the worker's traceback)."""

    def __init__(self, files: list[Path], order: torch.Tensor | None, size: int, mode: str):
        self.files, self.order, self.size, self.mode = files, order, size, mode
        self.channels = 1 if mode == "L" else 3

    def __len__(self) -> int:
        return len(self.files) if self.order is None else len(self.order)

    def __getitem__(self, i: int):
        j = i if self.order is None else int(self.order[i])
        try:
            return torch.from_numpy(load_image(self.files[j], self.size, self.mode)), i, ""
        except DataError as exc:
            return torch.zeros(self.channels, self.size, self.size, dtype=torch.uint8), i, str(exc)


def decoded_batches(files: list[Path], order: torch.Tensor | None, channels: int, size: int, batch_size: int,
                    workers: int):
    """Yield (uint8 (B, channels, size, size) images, positions in ``order``) in order, decoded by
    ``workers`` DataLoader processes (0 = in this process)."""
    ds = ImageFiles(files, order, size, "L" if channels == 1 else "RGB")
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                        prefetch_factor=2 if workers else None)
    for images, pos, errors in loader:
        bad = [e for e in errors if e]
        if bad:
            raise DataError(bad[0])
        yield images, pos


def prepare_files(cfg: DatasetParams, out: Path, workers: int = 0, seed: int = 0) -> DatasetFacts:
    """``storage: files``: list an image folder's files, check every image decodes, and measure the
    train split's per-channel mean and std exactly (integer pixel sums) in one streamed pass."""
    if cfg.name != "imagefolder":
        raise DataError(f"dataset.storage: files reads image folders only (dataset.name: imagefolder), not "
                        f"{cfg.name!r}; use storage: arrays")
    if cfg.image_size is None:
        raise DataError("dataset.image_size: required with dataset.storage: files (every image is resized to it "
                        "when it is read)")
    lay = imagefolder_layout(cfg)
    k, size = len(lay.classes), cfg.image_size
    channels = 1 if lay.mode == "L" else 3
    counts = {}
    s1, s2 = np.zeros(channels, np.int64), np.zeros(channels, np.int64)
    listed = {split: folder_files(d, lay.classes) for split, d in (("train", lay.train), ("test", lay.test))}
    if cfg.val_size:
        files, labels = listed["train"]
        keep, val = stratified_split(labels, cfg.val_size, k, derive_seed(seed, "val"), "dataset.val_size")
        listed["train"] = [files[i] for i in keep], labels[keep]
        listed["val"] = [files[i] for i in val], labels[val]
    for split, (files, labels) in listed.items():
        d = lay.train if split == "val" else getattr(lay, split)
        c = np.bincount(labels, minlength=k)
        absent = [lay.classes[i] for i in np.flatnonzero(c == 0)]
        if absent:
            raise DataError(f"{cfg.name}: class(es) {', '.join(map(repr, absent[:5]))} absent from the {split} "
                            f"split")
        counts[split] = c.tolist()
        batches = decoded_batches(files, None, channels, size, 256, workers)
        for images, _ in progress(batches, total=-(-len(files) // 256), desc=f"checking {d.name}/", unit="batch"):
            if split == "train":
                a, b = pixel_sums(images.numpy())
                s1, s2 = s1 + a, s2 + b
        rel = [p.resolve().relative_to(lay.root.resolve()).as_posix() for p in files]
        (out / f"{split}_files.txt").write_text("".join(r + "\n" for r in rel), encoding="utf-8")
        np.save(out / f"{split}_labels.npy", labels, allow_pickle=False)
    mean, std = channel_moments(s1, s2, sum(counts["train"]) * size * size)
    facts = DatasetFacts(name=cfg.name, channels=channels, height=size, width=size, num_classes=k,
                         class_names=list(lay.classes), mean=mean, std=std, counts=counts, format=FORMAT,
                         storage="files", root=str(lay.root.resolve()))
    write_json(out / "facts.json", facts.to_dict())
    return facts
