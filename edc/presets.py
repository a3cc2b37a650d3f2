"""The paper's methods and design-space sweeps, expressed only as params values.

A preset is a set of ``key=value`` overrides that ``edc exp preset NAME`` passes to
``dvc exp run -S``; there is no code path behind a preset name, so ``dvc params diff`` shows all
that a preset changes. Every preset sets the same keys (:data:`METHOD_KEYS`), so presets do not
depend on which experiment last left its params in the workspace.

Evaluation stays the same for every method (students, epochs, seeds, optimiser, temperature), so
the table compares condensed sets on one budget; a preset changes the evaluation only where the
method itself is defined by it (SRe2L and G-VBSM: cosine schedule, no EMA of the weights, and
SRe2L's large batch).

A sweep varies one design choice of the paper around the ``edc`` preset.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edc.errors import ParamsError
from edc.params import Params, read_yaml

# The keys any preset sets; each preset gives all of them.
METHOD_KEYS = (
    "init.method", "synth.iterations", "synth.observers", "alpha", "synth.flatness.mode", "synth.aug.scale_min",
    "synth.layers", "synth.r_bn", "synth.class_views", "stats.augment", "relabel.batch_size", "evaluate.labels",
    "evaluate.schedule", "zeta", "evaluate.ema", "synth.lr",
)

PRESET_HELP = {
    "edc": "EDC: real init, soft category-aware matching (alpha 0.5) averaged over layers against statistics of "
           "the synthesis crops, at least 16 crops of each class per iteration, pixel learning rate 0.1, all "
           "observers, flatness (Eq. 7), weak augmentation, smoothing LR (zeta 2), EMA evaluation",
    "rded": "RDED: rded init, no synthesis steps, soft labels",
    "sre2l": "SRe2L: noise init, global matching only (alpha 1) summed over layers against un-augmented "
             "statistics, pixel learning rate 0.05, one observer, no flatness, RRC scale 0.08, cosine schedule "
             "(zeta 1), no EMA evaluation, large evaluation batch",
    "gvbsm": "G-VBSM: as SRe2L but matching all observers and the default evaluation batch",
    "random-soft": "random real images (real init, no synthesis) with stored soft labels",
    "random-hard": "random real images (real init, no synthesis) with hard class labels",
}


# synth.class_views of the edc preset: crops of each class per iteration (at ipc 1 sixteen crops of the
# class's one image, at ipc 10 two of each, from ipc 16 up one). Chosen on the validation splits of
# MNIST-5k and Fashion-MNIST-5k at ipc 1 among 1, 4, 8, 16 and 32.
CLASS_VIEWS = 16

# synth.lr of the edc preset (Adam on the pixels). 0.1 against 0.05 with class_views 16, ipc 1: mean
# validation accuracy 90.17 / 89.47 on MNIST-5k and 73.33 / 72.87 on Fashion-MNIST-5k (1000 iterations
# at 0.05: 90.27 on MNIST, at 3.3 times the synthesis time). SRe2L and G-VBSM keep 0.05, the value their
# rows were measured with.
SYNTH_LR = 0.1
BASELINE_SYNTH_LR = 0.05


def _edc(p: Params) -> dict[str, Any]:
    return {
        "init.method": "real", "synth.iterations": 300, "synth.observers": [m.name for m in p.observers.models],
        "alpha": 0.5, "synth.flatness.mode": "logits", "synth.aug.scale_min": 0.5, "synth.layers": "mean",
        "synth.r_bn": 1.0, "synth.class_views": CLASS_VIEWS, "stats.augment": True, "relabel.batch_size": 25,
        "evaluate.labels": "soft", "evaluate.schedule": "smoothing", "zeta": 2.0, "evaluate.ema": True,
        "synth.lr": SYNTH_LR,
    }


def preset_overrides(name: str, p: Params) -> dict[str, Any]:
    """The values preset ``name`` gives to :data:`METHOD_KEYS`, for the observers of params ``p``."""
    if name not in PRESET_HELP:
        raise ParamsError("preset", [f"unknown preset {name!r} (known: {', '.join(PRESET_HELP)})"])
    v = _edc(p)
    if name == "rded":
        v.update({"init.method": "rded", "synth.iterations": 0})
    elif name in ("random-soft", "random-hard"):
        v.update({"synth.iterations": 0,
                  "evaluate.labels": "soft" if name == "random-soft" else "hard"})
    elif name in ("sre2l", "gvbsm"):
        v.update({"init.method": "noise", "alpha": 1.0, "synth.flatness.mode": "off", "synth.aug.scale_min": 0.08,
                  "synth.layers": "sum", "synth.r_bn": 0.1, "synth.class_views": 1, "stats.augment": False,
                  "synth.lr": BASELINE_SYNTH_LR,
                  "evaluate.schedule": "cosine", "zeta": 1.0, "evaluate.ema": False})
        if name == "sre2l":
            v.update({"synth.observers": [p.observers.models[0].name], "relabel.batch_size": 100})
    assert set(v) == set(METHOD_KEYS)
    return v


@dataclass(frozen=True)
class Sweep:
    key: str
    values: tuple[Any, ...]
    help: str


SWEEPS = {
    "alpha": Sweep("alpha", (0.0, 0.25, 0.5, 0.75, 1.0), "global (1) vs per-class (0) statistics matching"),
    "zeta": Sweep("zeta", (1.0, 1.5, 2.0, 2.5, 3.0), "smoothing LR schedule slowdown (1 = cosine)"),
    "init": Sweep("init.method", ("noise", "real", "rded"), "initialisation of the synthetic images"),
    "flatness": Sweep("synth.flatness.mode", ("off", "logits", "stats"), "flatness regularisation: Eq. 7 / Eq. 6"),
    "ema": Sweep("evaluate.ema", (True, False), "evaluate the EMA of the student's weights"),
    "weak_aug": Sweep("synth.aug.scale_min", (0.5, 0.08), "synthesis RandomResizedCrop scale lower bound"),
    "eval_batch": Sweep("relabel.batch_size", (10, 25, 50), "post-evaluation batch size (fixed by the plan)"),
    "ipc": Sweep("ipc", (1, 10, 50), "images per class"),
    "iterations": Sweep("synth.iterations", (75, 150, 300), "synthesis iterations per batch"),
    "class_views": Sweep("synth.class_views", (1, 4, 8, 16, 32), "crops of each class matched per synthesis iteration"),
    "flat_weight": Sweep("synth.flatness.weight", (0.25, 1.0), "flatness weight (the paper's Table 4 best: 0.25)"),
    "layers": Sweep("synth.layers", ("mean", "sum"), "matching over an observer's layers: mean (Eq. 16) or sum"),
    "r_bn": Sweep("synth.r_bn", (0.1, 1.0, 3.0), "weight of the matching loss"),
    "stats_aug": Sweep("stats.augment", (True, False), "targets from the synthesis crops or un-augmented images"),
    "synth_lr": Sweep("synth.lr", (0.05, 0.1, 0.25), "Adam learning rate on the pixels during synthesis"),
    "topk": Sweep("relabel.topk", (0, 5, 3, 1), "soft labels stored: all logits (0) or the k largest"),
    "labels": Sweep("evaluate.labels", ("soft", "hard"), "the students' targets: stored soft labels or classes"),
    "codec": Sweep("relabel.codec", ("float16", "int8", "hard"),
                   "stored logits: float16, 8-bit with a per-view scale and offset, or none (hard labels)"),
    "label_epochs": Sweep("relabel.label_epochs", (0, 50, 10, 1),
                          "epochs of views and labels stored and replayed in order (0 = every epoch)"),
}


def format_value(v: Any) -> str:
    """A value as DVC's ``-S key=value`` (Hydra syntax) reads it back to the same YAML value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, list):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{format_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, str) and (not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", v)
                               or v.lower() in ("true", "false", "null", "none", "inf", "nan")):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(v)


def label(v: Any) -> str:
    """A value as it appears in an experiment name."""
    return format_value(v).strip("[]").replace(",", "+")


def experiment_name(kind: str, ipc: int, value: Any = None) -> str:
    """``edc-ipc10`` for a preset; ``alpha-0.25-ipc10`` for a sweep point."""
    return f"{kind}-{label(value)}-ipc{ipc}" if value is not None else f"{kind}-ipc{ipc}"


def parse_name(name: str) -> tuple[str, str | None, int] | None:
    """Inverse of :func:`experiment_name`: (preset or sweep, value label or None, ipc), or None if the
    name is not one this module makes."""
    head, sep, ipc = name.rpartition("-ipc")
    if not sep or not ipc.isdigit():
        return None
    if head in PRESET_HELP:
        return head, None, int(ipc)
    for sweep in sorted(SWEEPS, key=len, reverse=True):
        if head.startswith(sweep + "-"):
            return sweep, head[len(sweep) + 1:], int(ipc)
    return None


# --- the paper's per-dataset settings (appendix Tables 6-10), as data: edc/dataset_presets/ ----------

PRESETS_DIR = Path(__file__).resolve().parent / "dataset_presets"


def _read_preset(name: str) -> dict[str, Any]:
    return read_yaml(PRESETS_DIR / f"{name}.yaml")


DATASET_HELP = {name: _read_preset(name)["help"] for name in _read_preset("common")["presets"]}


def dataset_overrides(name: str, root: str) -> dict[str, Any]:
    """The params values of the paper's setting for dataset ``name`` read from ``root``: the values of
    ``dataset_presets/common.yaml``, then those of ``dataset_presets/<name>.yaml``, the observer list it
    names (``observers.yaml``) as ``observers.models``, and all of them as RDED's scorers, synthesis's
    observers and relabel's teachers except those the file excludes (``synth_exclude``,
    ``teachers_exclude``)."""
    if name not in DATASET_HELP:
        raise ParamsError("dataset preset", [f"unknown dataset preset {name!r} (known: {', '.join(DATASET_HELP)})"])
    spec = _read_preset(name)
    obs = _read_preset("observers")[spec["observers"]]
    names = [o["name"] for o in obs]
    return {**_read_preset("common")["set"], **spec["set"], "dataset.root": root,
            "observers.models": obs, "init.observers": names,
            "synth.observers": [n for n in names if n not in spec.get("synth_exclude", [])],
            "relabel.teachers": [n for n in names if n not in spec.get("teachers_exclude", [])]}
