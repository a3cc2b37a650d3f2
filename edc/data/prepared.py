"""The prepared-dataset format (output of the ``prepare`` stage, input of every later stage).

A directory holding::

    facts.json          DatasetFacts below: name, channels, height, width, num_classes,
                        class_names, mean/std per channel (measured on the train split, pixels
                        scaled to [0, 1]), per-split counts, format version
    train_images.npy    uint8, shape (N, C, H, W)
    train_labels.npy    int64, shape (N,), values in [0, num_classes)
    test_images.npy     uint8, shape (M, C, H, W)
    test_labels.npy     int64, shape (M,)
    val_images.npy      only with ``dataset.val_size`` > 0: a stratified, seeded part of the source's
    val_labels.npy      train split, held out of ``train`` (facts.counts has a "val" entry then)

Plain ``.npy`` (no pickle): ``numpy.load(path)`` reads any of them. Images stay uint8 on disk and
are normalised with the facts' mean/std when a stage loads them. Stages memory-map the image arrays
and read them batch by batch (:mod:`edc.data.reading`), so no stage holds a whole split.

With ``dataset.storage: files`` (image folders too large to copy, e.g. ImageNet), ``<split>_images.npy``
is replaced by ``<split>_files.txt``: one image path per line, relative to ``facts.root``, in label
order. Stages then decode the files on the fly, in a DataLoader with ``workers`` processes, resized
exactly as ``storage: arrays`` would have stored them (:func:`edc.data.sources.load_image`).

This module is the format only (facts, arrays, normalisation) and imports nothing else of
``edc.data``; reading a prepared directory (memory-mapped batches, decoded files) is
:mod:`edc.data.reading`, which sits above it and :mod:`edc.data.stream`.
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
SPLITS = ("train", "test")  # always present; "val" too when facts.counts lists it


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
    storage: str = "arrays"  # arrays: <split>_images.npy | files: <split>_files.txt under root
    root: str | None = None  # storage files: the image folder the paths are relative to

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
    images: np.ndarray | None  # uint8 (N, C, H, W), memory-mapped when loaded; None for storage files
    labels: np.ndarray  # int64 (N,)
    files: list[Path] | None = None  # storage files: one image path per label

    def __len__(self) -> int:
        return len(self.labels)


def normalize(images_u8: torch.Tensor, facts: DatasetFacts) -> torch.Tensor:
    mean = torch.tensor(facts.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(facts.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images_u8.float() / 255.0 - mean) / std


def pixel_sums(images_u8) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel sums of the pixels and of their squares of uint8 (N, C, H, W) images, as exact
    integers (int64 holds them up to ~1e11 pixels per channel)."""
    v = np.asarray(images_u8).transpose(1, 0, 2, 3).reshape(images_u8.shape[1], -1).astype(np.int64)
    return v.sum(1), (v * v).sum(1)


def channel_moments(s1: np.ndarray, s2: np.ndarray, count: int) -> tuple[list[float], list[float]]:
    """Mean and std per channel of pixels scaled to [0, 1], from exact integer sums over ``count``
    pixels per channel; a constant channel gets std 1."""
    mean = s1.astype(np.float64) / (255.0 * count)
    var = np.maximum(s2.astype(np.float64) / (255.0 ** 2 * count) - mean * mean, 0.0)
    return [float(m) for m in mean], [float(np.sqrt(v)) or 1.0 for v in var]


def measure_facts(name: str, train: Split, test: Split, class_names: list[str], val: Split | None = None
                  ) -> DatasetFacts:
    n, c, h, w = train.images.shape
    k = len(class_names)
    s1, s2 = np.zeros(c, np.int64), np.zeros(c, np.int64)
    for i in range(0, n, 4096):  # bounded temporaries
        a, b = pixel_sums(train.images[i:i + 4096])
        s1, s2 = s1 + a, s2 + b
    mean, std = channel_moments(s1, s2, n * h * w)
    splits = (("train", train), ("test", test)) + ((("val", val),) if val is not None else ())
    counts = {s: np.bincount(sp.labels, minlength=k).tolist() for s, sp in splits}
    return DatasetFacts(name=name, channels=c, height=h, width=w, num_classes=k, class_names=list(class_names),
                        mean=mean, std=std, counts=counts)


def write_prepared(out: Path, facts: DatasetFacts, train: Split, test: Split, val: Split | None = None) -> None:
    for split, s in (("train", train), ("test", test)) + ((("val", val),) if val is not None else ()):
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


def split_files(path: str | Path, split: str) -> list[Path]:
    """The files of a prepared dataset that define ``split`` (for fingerprints of stage inputs)."""
    path = Path(path)
    return [f for f in (path / "facts.json", path / f"{split}_labels.npy", path / f"{split}_images.npy",
                        path / f"{split}_files.txt") if f.is_file()]


def read_file_list(f: Path, facts: DatasetFacts) -> list[Path]:
    try:
        lines = f.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{f}: missing from the prepared dataset") from None
    root = Path(facts.root or "")
    if not root.is_dir():
        raise DataError(f"{f.parent}/facts.json: the image folder {root} it lists files from does not exist; "
                        f"rerun prepare (dvc repro -f -s prepare) with dataset.root where the images are now")
    return [root / line for line in lines]


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
