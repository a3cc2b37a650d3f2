"""The prepared-dataset format (output of the ``prepare`` stage, input of every later stage).

A directory holding::

    facts.json          DatasetFacts below: name, channels, height, width, num_classes,
                        class_names, mean/std per channel (measured on the train split, pixels
                        scaled to [0, 1]), per-split counts, format version
    train_images.npy    uint8, shape (N, C, H, W)
    train_labels.npy    int64, shape (N,), values in [0, num_classes)
    test_images.npy     uint8, shape (M, C, H, W)
    test_labels.npy     int64, shape (M,)

Plain ``.npy`` (no pickle): ``numpy.load(path)`` reads any of them. Images stay uint8 on disk and
are normalised with the facts' mean/std when a stage loads them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edc.errors import DataError
from edc.io import read_json, write_json

FORMAT = "edc-prepared/1"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetFacts:
    """The one table of facts about a dataset that every later stage reads."""

    name: str
    channels: int
    height: int
    width: int
    num_classes: int
    class_names: list[str]
    mean: list[float]
    std: list[float]
    counts: dict[str, list[int]]  # split -> images per class
    format: str = FORMAT

    @property
    def image_size(self) -> int:
        return self.height

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DatasetFacts:
        return cls(**d)


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class PreparedDataset:
    facts: DatasetFacts
    train: Split
    test: Split

    def normalized(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A split as (float32 images normalised by the train mean/std, int64 labels)."""
        s = getattr(self, split)
        return normalize(torch.from_numpy(s.images), self.facts), torch.from_numpy(s.labels)


def normalize(images_u8: torch.Tensor, facts: DatasetFacts) -> torch.Tensor:
    mean = torch.tensor(facts.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(facts.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images_u8.float() / 255.0 - mean) / std


def measure_facts(name: str, train: Split, test: Split, class_names: list[str]) -> DatasetFacts:
    n, c, h, w = train.images.shape
    k = len(class_names)
    # float64 per-channel moments over all train pixels, one channel at a time to bound memory.
    mean, std = [], []
    for ch in range(c):
        x = train.images[:, ch].astype(np.float64) / 255.0
        mean.append(float(x.mean()))
        std.append(float(x.std()) or 1.0)
    counts = {s: np.bincount(sp.labels, minlength=k).tolist() for s, sp in (("train", train), ("test", test))}
    return DatasetFacts(name=name, channels=c, height=h, width=w, num_classes=k, class_names=list(class_names),
                        mean=mean, std=std, counts=counts)


def write_prepared(out: Path, facts: DatasetFacts, train: Split, test: Split) -> None:
    for split, s in (("train", train), ("test", test)):
        np.save(out / f"{split}_images.npy", np.ascontiguousarray(s.images, dtype=np.uint8), allow_pickle=False)
        np.save(out / f"{split}_labels.npy", np.ascontiguousarray(s.labels, dtype=np.int64), allow_pickle=False)
    write_json(out / "facts.json", facts.to_dict())


def read_facts(path: str | Path) -> DatasetFacts:
    f = Path(path) / "facts.json"
    if not f.is_file():
        raise DataError(f"{f}: not found; is {path} the output of the prepare stage?")
    try:
        facts = DatasetFacts.from_dict(read_json(f))
    except (ValueError, TypeError) as exc:
        raise DataError(f"{f}: not a prepared-dataset facts file ({exc})") from None
    if facts.format != FORMAT:
        raise DataError(f"{f}: format {facts.format!r}, this version reads {FORMAT!r}; rerun prepare")
    return facts


def load_prepared(path: str | Path) -> PreparedDataset:
    path = Path(path)
    facts = read_facts(path)
    splits = {}
    for split in SPLITS:
        arrays = []
        for kind in ("images", "labels"):
            f = path / f"{split}_{kind}.npy"
            try:
                arrays.append(np.load(f, allow_pickle=False))
            except FileNotFoundError:
                raise DataError(f"{f}: missing from the prepared dataset") from None
            except ValueError as exc:
                raise DataError(f"{f}: unreadable ({exc})") from None
        images, labels = arrays
        want = (facts.channels, facts.height, facts.width)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != want:
            raise DataError(f"{path}/{split}_images.npy: expected uint8 (N, {want[0]}, {want[1]}, {want[2]}), "
                            f"got {images.dtype} {images.shape}")
        if labels.shape != (len(images),):
            raise DataError(f"{path}/{split}_labels.npy: {labels.shape[0]} labels for {len(images)} images")
        splits[split] = Split(images, labels.astype(np.int64, copy=False))
    return PreparedDataset(facts, splits["train"], splits["test"])


def to_uint8(images: torch.Tensor, facts: DatasetFacts) -> torch.Tensor:
    """Inverse of :func:`normalize`, rounded to the nearest pixel value and clipped to [0, 255]."""
    mean = torch.tensor(facts.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(facts.std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((images.detach().float() * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)


def pixel_bounds(facts: DatasetFacts) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (low, high) of valid pixels in the normalised space, shaped (1, C, 1, 1)."""
    mean = torch.tensor(facts.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(facts.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (0.0 - mean) / std, (1.0 - mean) / std
