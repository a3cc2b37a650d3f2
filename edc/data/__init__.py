"""Datasets: source readers (registry), the prepared format, and batch augmentation."""

from edc.data.prepared import (
    DatasetFacts,
    PreparedDataset,
    Split,
    load_prepared,
    normalize,
    pixel_bounds,
    read_facts,
    to_uint8,
)
from edc.data.sources import Source, list_sources, read_source, register_source, stratified_split

__all__ = ["DatasetFacts", "PreparedDataset", "Source", "Split", "list_sources", "load_prepared", "normalize",
           "read_facts", "read_source", "register_source", "stratified_split", "prepare", "pixel_bounds", "to_uint8"]


def prepare(cfg, seed: int, out) -> DatasetFacts:
    """Read the source ``cfg`` names, measure its facts and write the prepared format into ``out``."""
    from edc.data.prepared import measure_facts, write_prepared

    src = read_source(cfg, seed)
    facts = measure_facts(cfg.name, src.train, src.test, src.class_names)
    write_prepared(out, facts, src.train, src.test)
    return facts
