"""Datasets: source readers (registry), the prepared format, and batch augmentation."""

from edc.data.prepared import (
    Batches,
    DatasetFacts,
    PreparedDataset,
    Split,
    SplitView,
    TensorSplit,
    as_split,
    load_prepared,
    normalize,
    pixel_bounds,
    read_facts,
    split_files,
    to_uint8,
)
from edc.data.sources import Source, list_sources, read_source, register_source, stratified_split

__all__ = ["Batches", "DatasetFacts", "PreparedDataset", "Source", "Split", "SplitView", "TensorSplit",
           "as_split", "list_sources", "load_prepared", "normalize", "pixel_bounds", "prepare", "read_facts",
           "read_source", "register_source", "split_files", "stratified_split", "to_uint8"]


def prepare(cfg, seed: int, out, workers: int = 0) -> DatasetFacts:
    """Read the source ``cfg`` names, measure its facts and write the prepared format into ``out``
    (``dataset.storage: files``: list an image folder's files instead of copying their pixels)."""
    from pathlib import Path

    from edc.data.prepared import measure_facts, write_prepared

    if cfg.storage == "files":
        from edc.data.stream import prepare_files

        return prepare_files(cfg, Path(out), workers)

    src = read_source(cfg, seed)
    facts = measure_facts(cfg.name, src.train, src.test, src.class_names)
    write_prepared(out, facts, src.train, src.test)
    return facts
