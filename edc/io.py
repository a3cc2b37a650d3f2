"""Atomic outputs and deterministic serialisation.

A stage writes into a temporary sibling of its output and renames it into place only when the
work is complete, so a crash never leaves a half-written output that DVC could cache as valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``path`` when the block succeeds.

    On an exception the temporary directory is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _tmp_sibling(path)
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    publish_dir(tmp, path)


def publish_dir(tmp: str | Path, path: str | Path) -> None:
    """Put the complete directory ``tmp`` in the place of ``path`` (two renames; a crash between
    them leaves ``path`` missing, which DVC reruns, never half-written)."""
    tmp, path = Path(tmp), Path(path)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists() or path.is_symlink():
        os.replace(path, old)
    os.replace(tmp, path)
    _remove(old)


def remove_stale_temporaries(path: str | Path) -> None:
    """Remove what a killed process left next to ``path``: ``.name.tmp-PID`` and ``.name.old-PID``
    whose process is gone."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for p in path.parent.glob(f".{path.name}.*-*"):
        kind, _, pid = p.name[len(path.name) + 2:].rpartition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running (a concurrent writer): leave it
        except ProcessLookupError:
            _remove(p)
        except PermissionError:
            continue


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", newline: str | None = None) -> Iterator[Any]:
    """Open a temporary file that replaces ``path`` when the block succeeds (``newline`` as :func:`open`'s)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, mode, newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def dumps_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, fixed indentation, trailing newline (byte-stable across runs)."""
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_file(path) as f:
        f.write(dumps_json(obj))


def write_csv(path: str | Path, rows: list[dict[str, Any]], fields: list[str], digits: int | None = 6) -> None:
    """``rows`` as a CSV file with the header ``fields`` (they choose the columns: other keys are left
    out), floats rounded to ``digits`` so that the bytes do not follow float noise (None: as they are).
    The project's one CSV writer, every DVC plot and export table goes through it; the file is replaced
    whole (:func:`atomic_file`)."""
    import csv

    with atomic_file(path, "w", newline="") as f:  # newline="": the csv module writes its own line ends
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: round(v, digits) if digits is not None and isinstance(v, float) else v for k, v in r.items()}
                    for r in rows)


def write_curves(directory: str | Path, curves: dict[str, list[dict[str, Any]]], fields: list[str]) -> None:
    """Replace ``directory`` with one CSV per curve (``<name>.csv``): the format of the stages' DVC plots."""
    with atomic_dir(directory) as tmp:
        for name, rows in curves.items():
            write_csv(tmp / f"{name}.csv", rows, fields)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def hash_file(h: Any, path: str | Path, chunk: int = 1 << 20) -> Any:
    """Feed the bytes of ``path`` to the hashlib object ``h``, a chunk at a time; returns ``h``."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h


def md5_file(path: str | Path, chunk: int = 1 << 20) -> str:
    return hash_file(hashlib.md5(), path, chunk).hexdigest()


# safetensors keeps its header metadata in a Rust HashMap, so a file with several metadata keys is
# written in a random key order: the same tensors give different bytes (and DVC hashes) per run. We
# store all metadata as one canonical JSON string under the single key "edc".
_META_KEY = "edc"


def save_safetensors(path: str | Path, tensors: dict, metadata: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(metadata, sort_keys=True)})


def read_safetensors_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata written by :func:`save_safetensors` (raises OSError/SafetensorError if unreadable)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(_META_KEY)
    return json.loads(raw) if raw else {}
