"""The paper's methods and design-space sweeps, expressed only as params values.

A preset is a set of ``key=value`` overrides that ``edc exp preset NAME`` passes to
``dvc exp run -S``; there is no code path behind a preset name, so ``dvc params diff`` shows all
that a preset changes.

A preset is a complete recipe: it sets every params key that shapes the condensed set or its
evaluation (:func:`pinned_keys`: every key of the schema but :data:`WORKSPACE_KEYS`), so the same
``edc exp preset NAME`` gives the same experiment whatever else params.yaml holds. A key a preset
does not name takes its schema default (so that a key added to the schema later is pinned too).

Every method is evaluated under one protocol (:data:`PROTOCOL`: the relabel plan, the teachers,
the students' recipe, schedule, EMA and budget), so that two rows differ only in how their images
were made. A method's own evaluation is a second, named preset (``sre2l-own-eval``).

Each value below carries its source: a table of the EDC paper (Shao et al., "Elucidating the Design Space of
Dataset Condensation", NeurIPS 2024), a public script, or the validation measurement that chose it (docs/presets.md).

A sweep varies one design choice of the paper around the ``edc`` preset.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edc.errors import ParamsError
from edc.params import Params, Section, get_dotted, read_yaml

# What a preset leaves to the workspace: the seed and the set's size, the trial, the machine, and the
# dataset with what belongs to it: the observers trained on it and the students sized for its images
# (`edc exp dataset` chooses both), and whether a mirrored image keeps its class (digits no, CIFAR yes).
# The applications (continual, slimming) are stages of their own that use a set, off by default.
WORKSPACE_KEYS = (
    "seed", "ipc", "trial", "device", "bf16", "workers", "eval_jobs", "launcher",
    "dataset", "observers", "evaluate.students", "synth.aug.flip", "relabel.aug.flip",
    "continual", "slimming",
    # measurements added beside a set's own (evaluation variants, HLR's full-data reference) and how many
    # student seeds measure it: they change neither the set nor its recipe, so the trial command may set them
    # for any preset (trials behind a results table use one seed each: the seed changes with the trial)
    "evaluate.variants", "reference", "evaluate.seeds",
)

# Observer lists resolved against the workspace's observers.models
ALL_OBSERVERS = "<all observers>"
ONE_OBSERVER = "<one observer>"  # a ResNet-18 where there is one (SRe2L's and RDED's CIFAR model), else the first


def _is_workspace(key: str) -> bool:
    return any(key == w or key.startswith(w + ".") for w in WORKSPACE_KEYS)


def _leaves(model: type[Section], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            out += _leaves(ann, prefix + name + ".")
        else:
            out.append((prefix + name, field))
    return out


def pinned_keys() -> tuple[str, ...]:
    """Every params key a preset sets: the schema's keys (a list is one key) but :data:`WORKSPACE_KEYS`."""
    return tuple(k for k, _ in _leaves(Params) if not _is_workspace(k))


# --- the shared evaluation protocol (every method's row) -------------------------------------------
PROTOCOL: dict[str, Any] = {
    "relabel.teachers": ALL_OBSERVERS,   # the same teachers and stored labels for every row
    "relabel.epochs": 200,               # the budget grows as ipc shrinks (the paper: 1000 epochs at ipc 1)...
    "relabel.min_steps": 1000,           # ...at least 1000 optimiser steps: ipc 1 1000 epochs, ipc 10 250
    "relabel.batch_size": 25,            # the paper's CIFAR-10 post-evaluation batch (Table 10)
    "relabel.topk": 0,                   # all logits stored...
    "relabel.codec": "int8",             # ...in 8 bits with a per-view scale and offset...
    "relabel.label_epochs": 0,           # ...for the epochs that give each class 1,500 labelled views: every
    "relabel.label_views": 1500,         # epoch at ipc 1, 150 of 250 at ipc 10 (1,000 cost the ResNet-18 and ViT
                                         # validation points): with the codec, chosen on validation (docs/format.md)
    "relabel.cutmix": False,
    "relabel.aug.scale_min": 0.08,       # the public CIFAR recipe's 0.08-1 views, chosen on validation at ipc 1
    "relabel.aug.randaugment": 0,        # off for every row (the paper's Tables 7-10 use it; the dataset presets
    "relabel.aug.magnitude": 9,          # turn it on): the project's measurements ran without it
    "evaluate.labels": "soft",
    "evaluate.loss": "kl",
    "evaluate.temperature": 4.0,
    "evaluate.lr": 0.001,                # AdamW 1e-3 (Tables 6-10)
    "evaluate.weight_decay": 0.01,       # (the released code's AdamW)
    "evaluate.schedule": "smoothing",    # smoothing LR (Tables 6-9)...
    "zeta": 2.0,                         # ...zeta 2
    "evaluate.milestones": [0.8, 0.9, 0.95],
    "evaluate.gamma": 0.5,
    "evaluate.ema": True,                # EMA-based evaluation, rate 0.99 (Tables 6-10)
    "evaluate.ema_rate": 0.99,
    "evaluate.ema_warmup": 10,           # the EMA's warm-up (Table 20: a slow EMA collapses when steps are few)
    "evaluate.eval_every": 50,
}

# --- the project's EDC (params.yaml's defaults; docs/presets.md lists every deviation from the paper) ---
EDC: dict[str, Any] = {
    "init.method": "real",               # the paper's small-image initialisation (Tables 8-10)
    "init.observers": ALL_OBSERVERS,
    "init.candidates": 50, "init.crops": 1, "init.factor": 1, "init.scale_min": 1.0, "init.batch_size": 500,
    "stats.augment": True,               # project: targets of the crops synthesis shows (docs/presets.md)
    "stats.draws": 2,
    "stats.batch_size": 500,
    "alpha": 0.5,                        # Tables 6-10
    "synth.observers": ALL_OBSERVERS,    # "various backbones", one per iteration
    "synth.iterations": 300,             # project (the paper: 75 on CIFAR-10, Table 10)
    "synth.lr": 0.1,                     # project (the paper: 0.05); chosen on validation, docs/presets.md
    "synth.lr_schedule": "cosine",
    "synth.batch_size": "all",           # Table 10
    "synth.r_bn": 1.0,                   # project; with the mean over layers
    "synth.layers": "mean",              # Eq. 16
    "synth.class_var": "pooled",         # a class's variance (Definition B.1)
    "synth.first_layer_weight": 1.0,
    "synth.targets": "data",
    "synth.ce_weight": 1.0,
    "synth.class_views": 16,             # project (the paper: one crop per image); docs/presets.md
    "synth.flatness.mode": "logits",     # Eq. 7
    "synth.flatness.weight": 1.0,        # project (Table 4's best: 0.25)
    "synth.flatness.beta": 0.99,         # Tables 6-10
    "synth.flatness.tau": 4.0,           # Tables 6-10
    "synth.aug.kind": "crop",
    "synth.aug.jitter": 4,
    "synth.aug.scale_min": 0.5,          # weak augmentation, scale (0.5, 1) (Table 5)
}

# --- EDC as the paper prints it for small images (Tables 8-10; CIFAR-10's where they differ) ----------
EDC_PAPER: dict[str, Any] = {
    **EDC,
    "synth.iterations": 75,              # Table 10 (CIFAR-10, batch "All")
    "synth.lr": 0.05,                    # Tables 6-10
    "synth.class_views": 1,              # one crop per image: the paper matches the batch it crops
    "stats.augment": False,              # statistics of the original images (Eq. 5, Definition B.1)
    "synth.flatness.weight": 0.25,       # Table 4's best (the tables print no weight)
    # The paper prints no matching weight; these are the released code's (r_bn 0.01 times
    # the sum over layers, the first hooked layer x10). The code sums where Eq. 16 averages, and 0.01
    # was set for the sum.
    "synth.r_bn": 0.01,
    "synth.layers": "sum",
    "synth.first_layer_weight": 10.0,
}

# --- SRe2L's small-image recover (VILA-Lab/SRe2L small_dataset/recover_cifar.{py,sh}) --
SRE2L: dict[str, Any] = {
    **EDC,
    "init.method": "noise",              # inputs = randn
    "synth.observers": ONE_OBSERVER,     # --arch-name resnet18: one model
    "synth.iterations": 1000,            # --iteration 1000
    "synth.lr": 0.25,                    # --lr 0.25
    "synth.lr_schedule": "cosine",       # lr_cosine_policy
    "synth.batch_size": 10,              # --batch-size 10 in the cifar10 run script (100 for cifar100)
    "alpha": 1.0,                        # the global BatchNorm statistics only
    "synth.targets": "running",          # against each BatchNorm's running_mean / running_var
    "stats.augment": False,              # (the per-class targets are unused at alpha 1)
    "synth.r_bn": 0.01,                  # --r-bn 0.01
    "synth.layers": "sum",               # sum over the BatchNorm layers
    "synth.first_layer_weight": 10.0,    # first_bn_multiplier 10
    "synth.class_views": 1,
    "synth.flatness.mode": "off",
    "synth.aug.kind": "jitter",          # a random roll of up to 4 pixels each iteration, no crop
    "synth.aug.jitter": 4,
}

# --- G-VBSM as the EDC paper describes its baseline (G-VBSM's own CIFAR script not read: see docs) ----
GVBSM: dict[str, Any] = {
    **EDC,
    "init.method": "noise",              # Gaussian initialisation (EDC Sec. 3, Fig. 3)
    "alpha": 1.0,                        # Form (1), global statistics (EDC Sec. 3)
    "synth.observers": ALL_OBSERVERS,    # various backbones (EDC A.2, Table 11)
    "synth.iterations": 150,             # twice EDC's (EDC A.1: "half of those used in SRe2L and G-VBSM")
    "synth.lr": 0.05,                    # Tables 6-10's synthesis rate (not confirmed for G-VBSM)
    "synth.aug.scale_min": 0.08,         # the "too restrictive" crop threshold EDC's weak augmentation fixes
    "stats.augment": True,               # statistics of the train set under the same crops (its recover's
                                         # statistics pass, as code derived from it shows; unconfirmed)
    "synth.r_bn": 0.01,                  # the lineage's r_bn and first-layer x10 (not confirmed for G-VBSM)
    "synth.layers": "sum",
    "synth.first_layer_weight": 10.0,
    "synth.class_views": 1,
    "synth.flatness.mode": "off",        # flatness is EDC's (design choice 1)
}

# --- RDED (its public CIFAR scripts: --factor 1 --num-crop 5 --mipc 300; argument.py) ----------------
RDED: dict[str, Any] = {
    **EDC,
    "init.method": "rded",
    "init.observers": ONE_OBSERVER,      # --arch-name: one model scores the patches
    "init.candidates": 300,              # --mipc 300: real images per class
    "init.crops": 5,                     # --num-crop 5: patches scored per image
    "init.factor": 1,                    # --factor 1 on CIFAR: one patch per image (RDED's CIFAR scripts)
    "init.scale_min": 0.08,              # --min-scale-crops 0.08 (RandomResizedCrop)
    "synth.iterations": 0,               # no optimisation
}

RANDOM: dict[str, Any] = {**EDC, "init.method": "real", "synth.iterations": 0}

# SRe2L's own evaluation (a public copy of its cifar10 run script: relabel 400 epochs, batch 128), with
# the cosine schedule and no EMA the sre2l row used before the shared protocol
SRE2L_OWN_EVAL: dict[str, Any] = {
    "relabel.epochs": 400, "relabel.min_steps": 0, "relabel.batch_size": 128,
    "evaluate.schedule": "cosine", "zeta": 1.0, "evaluate.ema": False,
}

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "edc": ("EDC, the project's recipe: real init, alpha 0.5 averaged over layers against statistics of the "
            "synthesis crops, 16 crops of each class per iteration, pixel lr 0.1, flatness 1.0, all observers "
            "(docs/presets.md lists every deviation from the paper)", {**EDC, **PROTOCOL}),
    "edc-paper": ("EDC as the paper prints it for small images (Tables 8-10): real init, 75 iterations at lr 0.05, "
                  "one crop per image, statistics of the original images, flatness 0.25", {**EDC_PAPER, **PROTOCOL}),
    "rded": ("RDED: the best of 5 patches of each of 300 images per class (factor 1), no synthesis",
             {**RDED, **PROTOCOL}),
    "sre2l": ("SRe2L's recover: noise init, one observer, 1000 iterations at lr 0.25, jitter 4, BatchNorm running "
              "statistics (alpha 1, summed, first layer x10, r_bn 0.01)", {**SRE2L, **PROTOCOL}),
    "sre2l-own-eval": ("sre2l's images under SRe2L's own evaluation (cosine, no EMA, 400 epochs, batch 128)",
                       {**SRE2L, **PROTOCOL, **SRE2L_OWN_EVAL}),
    "gvbsm": ("G-VBSM: noise init, all observers, global matching of measured statistics under 0.08-1 crops, "
              "twice edc-paper's iterations, no flatness", {**GVBSM, **PROTOCOL}),
    "random-soft": ("random real images (real init, no synthesis) with stored soft labels", {**RANDOM, **PROTOCOL}),
    "random-hard": ("random real images (real init, no synthesis) with hard class labels",
                    {**RANDOM, **PROTOCOL, "evaluate.labels": "hard"}),
}
PRESET_HELP = {name: text for name, (text, _) in PRESETS.items()}


def _one_observer(p: Params) -> str:
    models = p.observers.models
    return next((m.name for m in models if m.arch in ("resnet18", "tv_resnet18")), models[0].name)


def _schema_default(key: str) -> Any:
    field = dict(_leaves(Params))[key]
    if field.is_required():
        raise ParamsError("preset", [f"{key}: no preset value and no schema default"])
    value = field.get_default(call_default_factory=True)
    return value.model_dump() if isinstance(value, Section) else value


def preset_overrides(name: str, p: Params) -> dict[str, Any]:
    """The values preset ``name`` gives to every :func:`pinned_keys` key, its observer lists resolved
    against ``p``'s observers (the only part of ``p`` it reads)."""
    if name not in PRESETS:
        raise ParamsError("preset", [f"unknown preset {name!r} (known: {', '.join(PRESETS)})"])
    given = PRESETS[name][1]
    resolve = {ALL_OBSERVERS: [m.name for m in p.observers.models], ONE_OBSERVER: [_one_observer(p)]}
    out = {}
    for key in pinned_keys():
        value = given[key] if key in given else _schema_default(key)
        out[key] = resolve[value] if isinstance(value, str) and value in resolve else value
    return out


def preset_differences(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """{key: the preset's value} for every pinned key where ``params`` (an experiment's params.yaml as a
    mapping) differs from preset ``name`` as it stands now. Raises ParamsError for params that no
    longer validate."""
    from edc.params import parse_params

    want = preset_overrides(name, parse_params(params))
    return {key: value for key, value in want.items() if get_dotted(params, key, "(absent)") != value}


def preset_mismatch(name: str, params: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """``key: value (preset: value)`` for every pinned key but ``ignore`` where ``params`` differs from
    preset ``name``'s value; [] when the experiment ran the preset as it stands now. Params that no
    longer validate are one line saying so."""
    try:
        diff = preset_differences(name, params)
    except ParamsError as exc:
        return [f"params do not validate ({exc})"]
    return [f"{key}: {get_dotted(params, key, '(absent)')!r} (preset: {value!r})" for key, value in diff.items()
            if key not in ignore]


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
    "codec": Sweep("relabel.codec", ("int8", "float16", "hard"),
                   "stored logits: 8-bit with a per-view scale and offset, float16, or none (hard labels)"),
    "label_epochs": Sweep("relabel.label_epochs", (0, 50, 10, 1),
                          "epochs of views and labels stored and replayed in order (0 = by label_views)"),
    "label_views": Sweep("relabel.label_views", (1500, 0, 2000, 1000, 500, 100, 10),
                         "labelled views stored per class, in whole epochs (0 = every epoch)"),
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
    name is not one this module makes. A trial suffix (``-t3``, which ``edc exp preset --trials``
    appends) is dropped: the trial an experiment ran is its ``trial`` param."""
    trial = re.fullmatch(r"(.*-ipc\d+)-t\d+", name)
    head, sep, ipc = (trial.group(1) if trial else name).rpartition("-ipc")
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
