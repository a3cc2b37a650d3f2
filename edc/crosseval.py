"""``edc evaluate``: any condensed set, any architecture, under the same fair budget.

A set is either a condensed set of this format (a directory of shards, an ``http(s)://`` URL or a
``pipe:`` command) or an image folder from elsewhere (``<folder>/<class>/<image>``: an ``edc export``,
a released SRe2L or RDED set saved as images). A folder has no plan: one is made here with the
``relabel`` params (epochs, ``min_steps``, batch size, crops; seeded as relabel seeds them) and,
for soft labels, the named teachers label its views now; hard labels need no teacher. Every student
is then trained by :func:`edc.evaluate.train_student` with the ``evaluate`` params (optimiser,
schedule, zeta, EMA) and seeds, and tested on the prepared test split (and validation split, when
there is one). Nothing is chosen, so nothing looks at the test split to choose.

Architectures: a name in ``evaluate.students`` (its kwargs), any registry architecture with its
default kwargs (``edc list``), or ``torchvision:NAME`` for any torchvision classification model.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from edc.data import DatasetFacts, normalize
from edc.errors import EdcError
from edc.evaluate import Recipe, summarize, train_student
from edc.params import Params, RelabelParams
from edc.plan import planned_epochs
from edc.relabel import epoch_plan_logits
from edc.seeding import derive_seed
from edc.shards import CondensedDataset, CondensedWriter, is_url, load_condensed

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


@dataclass
class Cell:
    """One set x architecture x label kind: accuracies over seeds."""
    accs: list[float]
    val_accs: list[float]

    def text(self) -> str:
        mean, std = summarize(self.accs)
        return f"{100 * mean:.2f} ± {100 * std:.2f}"


def is_imagefolder(path: str | Path) -> bool:
    """A local folder without image shards (an ``edc export`` keeps meta.json but no shards)."""
    if is_url(str(path)):
        return False
    p = Path(path)
    return p.is_dir() and not any(p.glob("images-*.tar"))


def class_index(folder: str, names: list[str], k: int) -> int | None:
    """The class a folder holds: its name among the dataset's class names, or ``NNN_...`` (edc export)."""
    if folder in names:
        return names.index(folder)
    m = re.match(r"^(\d+)(_|$)", folder)
    if m and int(m.group(1)) < k:
        return int(m.group(1))
    return None


def read_imagefolder(path: str | Path, facts: DatasetFacts) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, C, H, W) images and class indices of ``path/<class>/<image>``, checked against the
    test split's dataset: class folders named after its classes (or ``NNN_name``), images of its size."""
    from PIL import Image

    root = Path(path)
    folders = sorted(d for d in root.iterdir() if d.is_dir())
    if not folders:
        raise EdcError(f"{root}: no class folders (expected {root}/<class>/<image>.png)")
    mode = "L" if facts.channels == 1 else "RGB"
    images, labels = [], []
    for d in folders:
        c = class_index(d.name, facts.class_names, facts.num_classes)
        if c is None:
            raise EdcError(f"{d}: not a class of {facts.name} (classes: {', '.join(facts.class_names[:10])}...; "
                           f"or name the folder NNN_<anything> with NNN the class index)")
        for f in sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTS):
            with Image.open(f) as im:
                arr = np.asarray(im.convert(mode))
            if arr.shape[:2] != (facts.height, facts.width):
                raise EdcError(f"{f}: {arr.shape[1]}x{arr.shape[0]} pixels, the test split's images are "
                               f"{facts.width}x{facts.height}")
            images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            labels.append(c)
    if not images:
        raise EdcError(f"{root}: no images ({', '.join(sorted(IMAGE_EXTS))}) in its class folders")
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


def folder_as_set(path: str | Path, facts: DatasetFacts, relabel_cfg: RelabelParams, teachers: list | None, *,
                  seed: int, out: Path, bf16: bool = False) -> Path:
    """Write the image folder at ``path`` as a condensed set in ``out``: a plan made with the relabel
    params and the teachers' logits on it (zeros without teachers: hard labels only)."""
    u8, y = read_imagefolder(path, facts)
    x = normalize(u8, facts)
    epochs = planned_epochs(relabel_cfg.epochs, relabel_cfg.min_steps, len(y), relabel_cfg.batch_size)
    meta = {"dataset": facts.to_dict(), "class_names": facts.class_names, "num_classes": facts.num_classes,
            "ipc": round(len(y) / facts.num_classes), "teachers": [], "epochs": epochs,
            "batch_size": relabel_cfg.batch_size, "topk": 0, "cutmix": relabel_cfg.cutmix,
            "aug": relabel_cfg.aug.model_dump(), "params": {"source": str(path), "seed": seed}}
    out.mkdir(parents=True, exist_ok=True)
    w = CondensedWriter(out, u8, y, meta)
    for e in range(epochs):
        plan, logits, _ = epoch_plan_logits(x, y, teachers, relabel_cfg, seed, e, bf16=bf16,
                                            pixels=(facts.mean, facts.std))
        if logits is None:  # hard labels only: the plan's views, no teacher
            logits = torch.zeros(len(y), facts.num_classes)
        w.write_epoch(e, plan, relabel_cfg.batch_size, logits, 0)
    w.close()
    return out


def student_spec(arch: str, students: list) -> SimpleNamespace:
    """``arch`` as a student spec: a name of ``evaluate.students``, a registry architecture, or
    ``torchvision:NAME``."""
    for s in students:
        if s.name == arch:
            return SimpleNamespace(name=s.name, arch=s.arch, kwargs=dict(s.kwargs))
    if arch.startswith("torchvision:"):
        return SimpleNamespace(name=arch, arch="torchvision", kwargs={"name": arch.split(":", 1)[1]})
    from edc.models import list_models

    if arch not in list_models():
        raise EdcError(f"--archs: unknown architecture {arch!r} (evaluate.students: "
                       f"{', '.join(s.name for s in students)}; registry: {', '.join(list_models())}; "
                       f"or torchvision:NAME)")
    return SimpleNamespace(name=arch, arch=arch, kwargs={})


def cross_evaluate(sets: list[str], archs: list[str], kinds: list[str], p: Params, data, *, teachers: list | None,
                   device: torch.device, run=None, say=print) -> dict[str, dict[str, dict[str, Cell]]]:
    """{set: {arch: {kind: Cell}}} for every set, architecture and label kind ("soft", "hard")."""
    test = data.view("test")
    val = data.view("val") if data.has_val else None
    specs = [student_spec(a, list(p.evaluate.students)) for a in archs]
    recipe = Recipe(p.evaluate, p.zeta, device, p.bf16)
    results: dict[str, dict[str, dict[str, Cell]]] = {}
    with tempfile.TemporaryDirectory(prefix="edc-evaluate-") as tmp:
        for i, src in enumerate(sets):
            if is_imagefolder(src):
                if "soft" in kinds and not teachers:
                    raise EdcError(f"{src}: an image folder has no stored soft labels; name --teachers "
                                   f"(observers) to label it, or use --labels hard")
                path = folder_as_set(src, data.facts, p.relabel, teachers if "soft" in kinds else None, seed=p.seed,
                                     out=Path(tmp) / f"set{i}", bf16=p.bf16)
            else:
                path = src
            results[src] = {}
            for kind in kinds:
                ds: CondensedDataset = load_condensed(path, labels=kind)
                if (ds.facts.name, ds.facts.num_classes) != (data.facts.name, data.facts.num_classes):
                    raise EdcError(f"{src}: made from {ds.facts.name}, but the test split is {data.facts.name}")
                for spec in specs:
                    cell = results[src].setdefault(spec.name, {}).setdefault(kind, Cell([], []))
                    for s in range(p.evaluate.seeds):
                        res = train_student(spec, recipe, ds, test, derive_seed(p.seed, "evaluate", spec.name, str(s)),
                                            val=val)
                        cell.accs.append(res.acc)
                        if res.val_acc is not None:
                            cell.val_accs.append(res.val_acc)
                        say(f"{src} | {spec.name} | {kind} labels | seed {s}: test {100 * res.acc:.2f}% "
                            f"({ds.epochs} epochs, {res.seconds:.0f} s)")
                        if run is not None:
                            with run.child(f"{Path(str(src)).name} {spec.name} {kind} seed {s}",
                                           {"edc.set": str(src), "edc.student": spec.name, "edc.labels": kind,
                                            "edc.seed": str(s)}) as r:
                                r.metrics({"test_acc": res.acc, **({"val_acc": res.val_acc}
                                                                   if res.val_acc is not None else {})})
    return results


def table(results: dict[str, dict[str, dict[str, Cell]]], archs: list[str], kinds: list[str]) -> str:
    """Markdown: rows are sets, columns architectures; each cell soft / hard test accuracy (%)."""
    names = list(next(iter(results.values())).keys()) if results else archs
    head = "| set | " + " | ".join(names) + " |"
    lines = [f"Test accuracy (%), mean ± std over seeds; each cell: {' / '.join(k + ' labels' for k in kinds)}.",
             "", head, "| --- |" + " --- |" * len(names)]
    for src, row in results.items():
        cells = [" / ".join(row[a][k].text() for k in kinds) for a in names]
        lines.append(f"| {src} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_json(results: dict[str, dict[str, dict[str, Cell]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for src, row in results.items():
        for arch, kinds in row.items():
            for kind, cell in kinds.items():
                mean, std = summarize(cell.accs)
                d = {"acc_mean": round(mean, 6), "acc_std": round(std, 6), "seeds": [round(a, 6) for a in cell.accs]}
                if cell.val_accs:
                    d["val_acc_mean"] = round(summarize(cell.val_accs)[0], 6)
                out.setdefault(src, {}).setdefault(arch, {})[kind] = d
    return out
