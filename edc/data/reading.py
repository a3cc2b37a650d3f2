"""Reading a prepared dataset: splits as lazy views, batches from memory-mapped arrays or decoded files.

Above :mod:`edc.data.prepared` (the format) and :mod:`edc.data.stream` (decoding image files), so
the package's imports run one way: reading -> stream -> sources -> prepared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edc.data.prepared import SPLITS, DatasetFacts, Split, normalize, read_facts, read_file_list
from edc.data.stream import decoded_batches
from edc.errors import DataError


@dataclass(frozen=True)
class PreparedDataset:
    facts: DatasetFacts
    train: Split
    test: Split
    workers: int = 0  # DataLoader processes decoding image files (storage files only)
    val: Split | None = None  # dataset.val_size > 0: held out of train, for choosing recipes

    @property
    def has_val(self) -> bool:
        return self.val is not None and len(self.val) > 0

    def view(self, split: str) -> SplitView:
        """``split`` as a :class:`SplitView`: labels in memory, images read batch by batch."""
        return SplitView(self, split)

    def batches(self, split: str, batch_size: int, order=None) -> Batches:
        """A re-iterable pass over ``split`` (all of it in order, or the indices ``order``) in batches
        of (float32 images normalised by the train mean/std, int64 labels)."""
        return Batches(self, split, batch_size, order)

    def take(self, split: str, index) -> torch.Tensor:
        """The normalised images at ``index`` (a list or 1-D tensor of indices), in that order."""
        index = torch.as_tensor(index, dtype=torch.int64).flatten()
        if len(index) == 0:
            f = self.facts
            return torch.empty(0, f.channels, f.height, f.width)
        return torch.cat([x for x, _ in self.batches(split, 1000, index)])

    def normalized(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole split as (normalised images, labels); for small data (tests, benchmarks)."""
        s = getattr(self, split)
        return self.take(split, torch.arange(len(s))), torch.tensor(s.labels)


class SplitView:
    """A split that reads its images only when asked: what the stages pass to training, statistics,
    initialisation and evaluation. :class:`TensorSplit` is the same interface over tensors."""

    def __init__(self, data: PreparedDataset, split: str):
        self.data, self.split = data, split
        self.labels = torch.as_tensor(getattr(data, split).labels)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, order=None) -> Batches:
        return Batches(self.data, self.split, batch_size, order)

    def take(self, index) -> torch.Tensor:
        return self.data.take(self.split, index)


class TensorSplit:
    """(normalised images, labels) tensors behind the :class:`SplitView` interface."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, order=None):
        for i in range(0, len(self), batch_size):
            sel = slice(i, i + batch_size) if order is None else torch.as_tensor(order)[i:i + batch_size]
            yield self.images[sel], self.labels[sel]

    def take(self, index) -> torch.Tensor:
        return self.images[torch.as_tensor(index, dtype=torch.int64)]


def as_split(images, labels: torch.Tensor | None = None) -> SplitView | TensorSplit:
    """What training, statistics, initialisation and evaluation accept, as one interface: a
    SplitView or TensorSplit as it is, an (images, labels) tuple of tensors, or the two tensors."""
    if labels is not None:
        return TensorSplit(images, labels)
    if isinstance(images, tuple):
        return TensorSplit(*images)
    return images


class Batches:
    """Batches of a prepared split, read lazily: memory-mapped array slices, or image files decoded
    by a DataLoader with the dataset's ``workers`` processes. Iterating again starts over."""

    def __init__(self, data: PreparedDataset, split: str, batch_size: int, order=None):
        self.data, self.split, self.batch_size = data, split, batch_size
        self.order = None if order is None else torch.as_tensor(order, dtype=torch.int64).flatten()
        labels = torch.as_tensor(getattr(data, split).labels)
        self.labels = labels if self.order is None else labels[self.order]

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self):
        s: Split = getattr(self.data, self.split)
        if s.files is not None:
            f = self.data.facts
            for u8, pos in decoded_batches(s.files, self.order, f.channels, f.height, self.batch_size,
                                           self.data.workers):
                yield normalize(u8, self.data.facts), self.labels[pos]
            return
        for i in range(0, len(self), self.batch_size):
            if self.order is None:
                u8 = np.array(s.images[i:i + self.batch_size])
            else:
                u8 = np.array(s.images[self.order[i:i + self.batch_size].numpy()])
            yield normalize(torch.from_numpy(u8), self.data.facts), self.labels[i:i + self.batch_size]


def load_prepared(path: str | Path, workers: int = 0) -> PreparedDataset:
    """Open a prepared dataset: labels in memory, images memory-mapped (or listed, for storage files)."""
    path = Path(path)
    facts = read_facts(path)
    splits = {}
    for split in SPLITS + (("val",) if "val" in facts.counts else ()):
        f = path / f"{split}_labels.npy"
        try:
            labels = np.load(f, allow_pickle=False)
        except FileNotFoundError:
            raise DataError(f"{f}: missing from the prepared dataset") from None
        except ValueError as exc:
            raise DataError(f"{f}: unreadable ({exc})") from None
        if facts.storage == "files":
            files = read_file_list(path / f"{split}_files.txt", facts)
            if len(files) != len(labels):
                raise DataError(f"{path}/{split}_labels.npy: {len(labels)} labels for {len(files)} files")
            splits[split] = Split(None, labels.astype(np.int64, copy=False), files)
            continue
        f = path / f"{split}_images.npy"
        try:
            images = np.load(f, allow_pickle=False, mmap_mode="r")
        except FileNotFoundError:
            raise DataError(f"{f}: missing from the prepared dataset") from None
        except ValueError as exc:
            raise DataError(f"{f}: unreadable ({exc})") from None
        want = (facts.channels, facts.height, facts.width)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != want:
            raise DataError(f"{path}/{split}_images.npy: expected uint8 (N, {want[0]}, {want[1]}, {want[2]}), "
                            f"got {images.dtype} {images.shape}")
        if labels.shape != (len(images),):
            raise DataError(f"{path}/{split}_labels.npy: {labels.shape[0]} labels for {len(images)} images")
        splits[split] = Split(images, labels.astype(np.int64, copy=False))
    return PreparedDataset(facts, splits["train"], splits["test"], workers, splits.get("val"))
