"""What a user of `make repro` came for: the students' accuracies from post_evaluate's
``reports/metrics.json`` as one short markdown table (``edc metrics``).

The file maps each student to ``acc_mean``/``acc_std`` (test, fractions), ``val_acc_mean``/
``val_acc_std`` (validation, absent when no validation split was held out), ``raw_acc_mean`` (the raw
weights when the evaluated model is the EMA) and ``seeds`` (test accuracy per seed).
"""

from __future__ import annotations

import json
from pathlib import Path

from edc.errors import ArtifactError

HEADER = "| student | test top-1 % | validation % | raw weights, test % | seeds |\n| --- | --- | --- | --- | --- |"


def _pct(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def accuracy_table(metrics: dict) -> str:
    """One row per student: test and validation accuracy as mean ± std in percent, the raw weights'
    test accuracy, and the number of seeds; '-' where the file has no such number."""
    rows = [HEADER]
    for student, m in metrics.items():
        rows.append(f"| {student} | {_pct(m['acc_mean'], m.get('acc_std'))} | "
                    f"{_pct(m.get('val_acc_mean'), m.get('val_acc_std'))} | {_pct(m.get('raw_acc_mean'))} | "
                    f"{len(m.get('seeds', {})) or '-'} |")
    return "\n".join(rows) + "\n"


def read_metrics(path: str | Path) -> dict:
    """post_evaluate's metrics file; a missing or unreadable one is an ArtifactError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; run `dvc repro` (or `make repro`) first")
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(metrics, dict) or not all(isinstance(m, dict) and "acc_mean" in m for m in metrics.values()):
        raise ArtifactError(f"{path}: not post_evaluate's metrics (each student needs acc_mean)")
    return metrics
