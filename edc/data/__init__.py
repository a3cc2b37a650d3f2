"""Datasets: source readers (registry), the prepared format, and batch augmentation."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edc.data.prepared import (
    DatasetFacts,
    Split,
    measure_facts,
    normalize,
    pixel_bounds,
    read_facts,
    split_files,
    to_uint8,
    write_prepared,
)
from edc.data.reading import Batches, PreparedDataset, SplitView, TensorSplit, as_split, load_prepared
from edc.data.sources import Source, list_sources, read_source, register_source, stratified_split
from edc.data.stream import prepare_files
from edc.seeding import derive_seed

if TYPE_CHECKING:  # annotations only: the data package imports no configuration code
    from edc.params import DatasetParams

__all__ = ["Batches", "DatasetFacts", "PreparedDataset", "Source", "Split", "SplitView", "TensorSplit",
           "as_split", "list_sources", "load_prepared", "normalize", "pixel_bounds", "prepare", "read_facts",
           "read_source", "register_source", "split_files", "stratified_split", "to_uint8"]


def prepare(cfg: DatasetParams, seed: int, out, workers: int = 0) -> DatasetFacts:
    """Read the source ``cfg`` names, measure its facts and write the prepared format into ``out``
    (``dataset.storage: files``: list an image folder's files instead of copying their pixels)."""
    if cfg.storage == "files":
        return prepare_files(cfg, Path(out), workers, seed)

    src = read_source(cfg, seed)
    train, val = carve_val(src.train, cfg.val_size, len(src.class_names), seed)
    facts = measure_facts(cfg.name, train, src.test, src.class_names, val)
    write_prepared(out, facts, train, src.test, val)
    return facts


def carve_val(train: Split, val_size: int, num_classes: int, seed: int) -> tuple[Split, Split | None]:
    """(what remains of ``train``, the validation split): ``val_size`` images, stratified by class and
    seeded (a seed of its own, so the test split does not move); (train, None) for 0."""
    if val_size == 0:
        return train, None
    keep, val = stratified_split(train.labels, val_size, num_classes, derive_seed(seed, "val"), "dataset.val_size")
    part = lambda idx: Split(np.ascontiguousarray(train.images[idx]) if train.images is not None else None,  # noqa: E731
                             train.labels[idx].astype(np.int64),
                             [train.files[i] for i in idx] if train.files is not None else None)
    return part(keep), part(val)
