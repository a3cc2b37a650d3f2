"""``edc report``: the paper's tables from the project's DVC experiments, checked against MLflow.

Experiments are found by name (:func:`edc.presets.experiment_name`: ``edc-ipc10``,
``alpha-0.25-ipc10``), in every commit's experiments (``dvc exp show --json -A``); when a name
occurs more than once, the newest wins. Accuracies are read from each experiment's
``reports/metrics.json`` as DVC stored it; the MLflow ``post_evaluate`` run tagged with the same
``dvc.exp_name`` must hold the same values, and a difference is printed and marked in the table.

A preset's trials (``edc-ipc1-t0`` ...; the trial is the experiment's ``trial`` param) are gathered
per method and ipc into the field's metrics (docs/metrics.md): accuracy with a 95 % t-interval over
trials, IOR against random-soft paired by trial and protocol, HLR against the stage ``reference``,
and accuracy with and without the students' augmentation.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edc.errors import EdcError
from edc.params import get_dotted, parse_params
from edc.presets import (
    PRESET_HELP,
    SWEEPS,
    format_value,
    label,
    parse_name,
    preset_differences,
    preset_mismatch,
    preset_overrides,
)

METRICS_FILE = "reports/metrics.json"
STORAGE_FILE = "reports/relabel.json"
REFERENCE_FILE = "reports/reference.json"
BASELINE = "random-soft"  # IOR's reference: the same number of random real images with the same soft labels


@dataclass
class Experiment:
    name: str
    rev: str
    timestamp: str
    params: dict[str, Any]
    metrics: dict[str, Any]  # student -> {acc_mean, acc_std, seeds, ...}
    mlflow_run: str | None = None
    mlflow_ok: bool | None = None  # None: no MLflow run (e.g. restored from DVC's run-cache)
    notes: list[str] = field(default_factory=list)
    storage: dict[str, Any] | None = None  # reports/relabel.json's bytes (images, labels, plan, container, total)
    relabel: dict[str, Any] | None = None  # the whole reports/relabel.json (images, epochs, codec, ...)
    continual: dict[str, Any] | None = None  # reports/continual.json when the stage ran enabled
    slimming: dict[str, Any] | None = None  # reports/slimming.json when the stage ran enabled
    reference: dict[str, Any] | None = None  # reports/reference.json's students when the stage ran enabled
    baseline: str = ""  # the commit the experiment ran on (its baseline rev in `dvc exp show`)

    @property
    def seeds(self) -> int:
        return max((len(m.get("seeds", {})) for m in self.metrics.values()), default=0)

    @property
    def trial(self) -> int:
        return int(self.params.get("trial") or 0)


def dvc_command() -> str:
    """``dvc`` on PATH, else the one installed next to this Python (an unactivated virtualenv)."""
    import shutil
    import sys

    found = shutil.which("dvc") or shutil.which("dvc", path=str(Path(sys.executable).parent))
    if not found:
        raise EdcError("dvc: not found on PATH nor next to this Python; install it (pip install dvc)")
    return found


def read_experiments(repo: str | Path = ".", commits: list[str] | None = None) -> dict[str, Experiment]:
    """Named experiments with post-evaluation metrics, newest per name; with ``commits`` (hashes or their
    first characters) only those that ran on one of them."""
    r = subprocess.run([dvc_command(), "exp", "show", "--json", "-A"], cwd=repo, capture_output=True, text=True)
    if r.returncode != 0:
        raise EdcError(f"dvc exp show failed:\n{r.stderr.strip()}")
    found: dict[str, Experiment] = {}
    for baseline in json.loads(r.stdout or "[]"):
        if commits and not any((baseline.get("rev") or "").startswith(c) for c in commits):
            continue
        for exp in baseline.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state")
            if state not in (None, "success"):  # queued, running or failed: no metrics of its own
                continue
            rev = (exp.get("revs") or [None])[0]
            if not rev or not rev.get("name") or parse_name(rev["name"]) is None:
                continue
            data = rev.get("data") or {}
            metrics = ((data.get("metrics") or {}).get(METRICS_FILE) or {}).get("data")
            params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
            if not metrics or not params:
                continue  # queued, running or failed
            files = data.get("metrics") or {}

            def read(path: str, files=files) -> dict[str, Any]:
                return (files.get(path) or {}).get("data") or {}

            storage = read(STORAGE_FILE).get("bytes")
            def whole(path: str, rev: str = rev["rev"]) -> dict[str, Any]:
                """The file as the experiment committed it: `dvc exp show` drops a metrics file's lists
                (the steps and results tables), so an application's report is read from git."""
                if not read(path).get("enabled"):
                    return {}
                r = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True)
                return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else {}

            cont, slim = whole("reports/continual.json"), whole("reports/slimming.json")
            ref = read(REFERENCE_FILE)
            e = Experiment(rev["name"], rev["rev"], data.get("timestamp") or "", params, metrics, storage=storage,
                           relabel=read(STORAGE_FILE) or None,
                           continual=cont if cont.get("enabled") else None,
                           slimming=slim if slim.get("enabled") else None,
                           reference=ref.get("students") if ref.get("enabled") else None,
                           baseline=baseline.get("rev") or "")
            if e.name not in found or e.timestamp > found[e.name].timestamp:
                found[e.name] = e
    return found


def check_mlflow(exps: dict[str, Experiment]) -> None:
    """Attach each experiment's MLflow post_evaluate run and whether its accuracies match DVC's."""
    import mlflow

    from edc.tracking import mlflow_experiment, tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(mlflow_experiment())
    if exp is None:
        return
    for e in exps.values():
        runs = client.search_runs([exp.experiment_id],
                                  f"tags.`dvc.exp_name` = '{e.name}' and tags.`edc.stage` = 'post_evaluate' "
                                  "and attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"])
        for run in runs:
            m = run.data.metrics
            ok = all(abs(m.get(f"{s}.acc_mean", math.nan) - v["acc_mean"]) <= 5e-6
                     and abs(m.get(f"{s}.acc_std", math.nan) - v["acc_std"]) <= 5e-6 for s, v in e.metrics.items())
            if ok or e.mlflow_run is None:
                e.mlflow_run, e.mlflow_ok = run.info.run_id, ok
            if ok:
                break
        if e.mlflow_ok is False:
            e.notes.append("MLflow differs")


def _cell(e: Experiment | None, student: str) -> str:
    if e is None or student not in e.metrics:
        return "-"
    m = e.metrics[student]
    flag = " (!)" if e.mlflow_ok is False else ""
    # With EMA evaluation, the raw weights' accuracy too: with few steps the EMA still carries part
    # of the initial weights.
    raw = f" (raw {100 * m['raw_acc_mean']:.2f})" if e.params.get("evaluate", {}).get("ema") and \
        "raw_acc_mean" in m else ""
    val = f" [val {100 * m['val_acc_mean']:.2f}]" if "val_acc_mean" in m else ""
    return f"{100 * m['acc_mean']:.2f} ± {100 * m['acc_std']:.2f}{raw}{val}{flag}"


def best_on_validation(points: list[tuple[str, Experiment]]) -> tuple[str, float] | None:
    """The point whose students' mean validation accuracy is highest (never the test split), with that
    mean; None when a point has no validation accuracy (made with dataset.val_size 0)."""
    scored = []
    for value, e in points:
        vals = [m["val_acc_mean"] for m in e.metrics.values() if "val_acc_mean" in m]
        if not vals or len(vals) != len(e.metrics):
            return None
        scored.append((sum(vals) / len(vals), value))
    if not scored:
        return None
    acc, value = max(scored)
    return value, acc


def _against_default(points: list[tuple[str, Experiment]], best: tuple[str, float], base: Experiment | None) -> str:
    """When the best point is not the edc preset's and leads it by less than the preset's seed spread
    on validation (the mean over students of the validation std), say so: such a lead is noise."""
    if base is None:
        return ""
    default = next((v for v, e in points if e is base), None)
    if default is None or default == best[0]:
        return ""
    vals = [m["val_acc_mean"] for m in base.metrics.values() if "val_acc_mean" in m]
    stds = [m["val_acc_std"] for m in base.metrics.values() if "val_acc_std" in m]
    if not vals or not stds:
        return ""
    lead, spread = best[1] - sum(vals) / len(vals), sum(stds) / len(stds)
    if lead >= spread:
        return f" It leads the edc preset's {default} by {100 * lead:.2f} points, more than its seed spread."
    return (f" Its lead over the edc preset's {default} ({100 * lead:.2f} points) is less than the preset's "
            f"seed spread on validation ({100 * spread:.2f}): noise, not a reason to change the default.")


def _students(exps: list[Experiment]) -> list[str]:
    out: list[str] = []
    for e in exps:
        out += [s for s in e.metrics if s not in out]
    return out


def _table(header: str, rows: list[tuple[str, Experiment | None]], students: list[str]) -> list[str]:
    lines = [f"| {header} | " + " | ".join(students) + " | experiment |",
             "| --- | " + " | ".join("---" for _ in students) + " | --- |"]
    for title, e in rows:
        lines.append(f"| {title} | " + " | ".join(_cell(e, s) for s in students) + f" | {e.name if e else '-'} |")
    return lines


def _preset_notes(rows: list[tuple[str, Experiment]]) -> list[str]:
    """A footnote naming each experiment whose params are not its preset's (an -S override, a preset
    changed since it ran), so that a row never passes for the preset it is named after."""
    groups: dict[tuple[str, str], list[str]] = {}  # experiments of one preset that differ alike: one line
    for method, e in rows:
        # another rule for the stored epochs that gives the same number at this ipc makes the same set
        diff = preset_mismatch(method, e.params, ignore=STORED_EPOCH_KEYS if _stores_as_preset(method, e) else ())
        if diff:
            shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
            groups.setdefault((method, shown), []).append(e.name)
    notes = [f"- {', '.join(names)}: not the {method} preset's params: {shown}"
             for (method, shown), names in groups.items()]
    return (["Rows that differ from their preset:", ""] + notes + [""]) if notes else []


STORED_EPOCH_KEYS = ("relabel.label_epochs", "relabel.label_views")  # the keys that set how many epochs are stored


def _keep_newest(slot: dict[int, Experiment], e: Experiment) -> None:
    """Put ``e`` in ``slot`` ({trial: experiment}) unless a newer experiment of its trial is there."""
    if e.trial not in slot or e.timestamp > slot[e.trial].timestamp:
        slot[e.trial] = e


def _set_arg(params: dict[str, Any], key: str) -> str:
    """``-S key=value`` as a shell word, the value as an experiment's params hold it."""
    return f"-S {shlex.quote(f'{key}={format_value(get_dotted(params, key))}')}"


def _stores_as_preset(method: str, e: Experiment) -> bool:
    """Whether ``e`` stored as many epochs of labels as preset ``method`` stores now at its ipc: a set made
    before relabel.label_views existed (every epoch) is the preset's own where the rule gives every epoch."""
    from edc.plan import stored_epochs

    rel, ipc = e.relabel or {}, (parse_name(e.name) or (None, None, 0))[2]
    if not rel.get("epochs") or not rel.get("stored_epochs") or not ipc:
        return False
    try:
        want = preset_overrides(method, parse_params(e.params))
    except EdcError:
        return False
    return stored_epochs(want.get("relabel.label_epochs", 0), rel["epochs"], want.get("relabel.label_views", 0),
                         ipc) == rel["stored_epochs"]


def _sweep_points(sweep: str, ipc: int, exps: dict[str, Experiment]) -> list[tuple[str, Experiment]]:
    """A sweep's points at ipc: its named experiments plus the edc preset at edc's own value."""
    s = SWEEPS[sweep]
    points: dict[str, Experiment] = {}
    for e in exps.values():
        kind, value, e_ipc = parse_name(e.name)
        if kind == sweep and e_ipc == ipc:
            points[value] = e
    base = exps.get(f"edc-ipc{ipc}")
    if base is not None and sweep != "ipc":
        v = preset_overrides("edc", parse_params(base.params)).get(s.key, get_dotted(base.params, s.key))
        points.setdefault(label(v), base)
    order = {label(v): i for i, v in enumerate(s.values)}
    return sorted(points.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))


@contextlib.contextmanager
def _figure(path: Path, title: str, xlabel: str, legend_size: int = 8, ylabel: str = "test accuracy (%)"):
    """An accuracy figure of the report: yields the axes, then labels, saves ``path`` and closes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)


def _plot(path: Path, title: str, xlabel: str, points: list[tuple[str, Experiment]], students: list[str]) -> None:
    with _figure(path, title, xlabel) as ax:
        xs = list(range(len(points)))
        for s in students:
            ys = [100 * e.metrics[s]["acc_mean"] if s in e.metrics else math.nan for _, e in points]
            err = [100 * e.metrics[s]["acc_std"] if s in e.metrics else 0 for _, e in points]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=s)
        ax.set_xticks(xs, [v for v, _ in points])


STORAGE_SWEEPS = ("codec", "topk", "label_epochs", "label_views")  # the sweeps that change how the labels are stored


def _relabel_value(e: Experiment, key: str, default: Any) -> Any:
    return get_dotted(e.params, f"relabel.{key}", default)


def _label_setting(e: Experiment) -> str:
    """How an experiment stores its labels, in words: "float16", "int8 top-3, 100 of 250 epochs stored",
    "hard labels". The stored epochs come from the relabel report (what the rule gave at this ipc), else
    from relabel.label_epochs."""
    codec, topk = _relabel_value(e, "codec", "float16"), _relabel_value(e, "topk", 0)
    if get_dotted(e.params, "evaluate.labels") == "hard" and codec != "hard":
        return "hard labels (soft labels stored, not read)"
    if codec == "hard":
        return "hard labels"
    rel = e.relabel or {}
    stored, epochs = rel.get("stored_epochs"), rel.get("epochs")
    if stored and epochs:
        part = f", {stored} of {epochs} epochs stored" if stored < epochs else ""
    else:
        le = _relabel_value(e, "label_epochs", 0)
        part = f", {le} stored epochs" if le else ""
    return codec + (f" top-{topk}" if topk else "") + part


def _needed_bytes(e: Experiment) -> int:
    """The bytes a user stores to train as ``e`` did: the set, less the soft labels when its students
    trained on the classes (evaluate.labels: hard on a set that stores soft labels)."""
    st = e.storage or {}
    labels = st.get("labels", st.get("soft_labels", 0))
    hard = get_dotted(e.params, "evaluate.labels") == "hard"
    return int(st["total"] - (labels if hard else 0))


@dataclass
class StoragePoint:
    """One way of storing the labels at one ipc, over the trials that ran it."""
    title: str  # _label_setting's words
    trials: list[Experiment]  # sorted by trial
    bytes: int  # what a user stores, the mean over the trials (they differ by a few bytes of meta.json)

    @property
    def names(self) -> str:
        names = [e.name for e in self.trials]
        return names[0] if len(names) == 1 else f"{names[0]} ... ({len(names)} trials)"


def _storage_experiments(ipc: int, exps: dict[str, Experiment]) -> list[Experiment]:
    """The experiments of the storage curve at ipc: the codec, topk, label_epochs and label_views sweeps'
    points, the edc preset's trials and the labels sweep's hard point, each with its relabel report."""
    found = []
    for e in exps.values():
        kind, value, e_ipc = parse_name(e.name) or (None, None, None)
        if e_ipc != ipc or not e.storage:
            continue
        if (kind in STORAGE_SWEEPS or (kind == "edc" and value is None)
                or (kind == "labels" and value == "hard")):
            found.append(e)
    return found


def storage_points(ipc: int, exps: dict[str, Experiment]) -> list[StoragePoint]:
    """The label storages tried at ipc, each over its trials (experiments that store the labels the
    same way, e.g. the edc preset's trials and the sweep point equal to it, are one point), sorted by
    bytes."""
    groups: dict[str, dict[int, Experiment]] = {}
    for e in sorted(_storage_experiments(ipc, exps), key=lambda e: e.name):
        _keep_newest(groups.setdefault(_label_setting(e), {}), e)
    points = [StoragePoint(title, [t[k] for k in sorted(t)],
                           round(math.fsum(_needed_bytes(e) for e in t.values()) / len(t)))
              for title, t in groups.items()]
    return sorted(points, key=lambda p: (p.bytes, p.title))


def _over_trials(trials: list[Experiment], student: str, key: str = "acc_mean") -> tuple[float, float | None] | None:
    values = [e.metrics[student][key] for e in trials if key in e.metrics.get(student, {})]
    return t_interval(values) if values and len(values) == len(trials) else None


def within_validation_rule(point: StoragePoint, full: StoragePoint, students: list[str]) -> bool | None:
    """The default's rule (docs/format.md): on every student, the point's mean validation accuracy is not
    below float16 logits of every epoch by more than the standard deviation of that full point's
    validation accuracy over its trials (seeds and draws together). None without validation accuracy."""
    verdicts = []
    for s in students:
        mine, ref = _over_trials(point.trials, s, "val_acc_mean"), _over_trials(full.trials, s, "val_acc_mean")
        if mine is None or ref is None:
            continue
        spread = statistics.stdev(e.metrics[s]["val_acc_mean"] for e in full.trials) if len(full.trials) > 1 \
            else full.trials[0].metrics[s].get("val_acc_std", 0.0)  # one trial: its seeds' spread
        verdicts.append(mine[0] >= ref[0] - spread - 1e-12)
    return all(verdicts) if verdicts else None


def _trials_acc(trials: list[Experiment], student: str) -> str:
    """Test accuracy over trials, "91.76 ± 0.65" (95 % interval), or one trial's "90.00 (± 1.00 seeds)";
    with the mean validation accuracy in brackets."""
    acc = _over_trials(trials, student)
    if acc is None:
        return "-"
    mean, half = acc
    if half is None:
        std = trials[0].metrics[student].get("acc_std")
        cell = f"{100 * mean:.2f}" + (f" (1 trial, ± {100 * std:.2f} over seeds)" if std else " (1 trial)")
    else:
        cell = f"{100 * mean:.2f} ± {100 * half:.2f}"
    val = _over_trials(trials, student, "val_acc_mean")
    return cell + (f" [val {100 * val[0]:.2f}]" if val else "")


def _image_cost(e: Experiment) -> float | None:
    """Bytes per image of ``e``'s set with a hard label (its image arrays and classes per image)."""
    st, n = e.storage or {}, (e.relabel or {}).get("images")
    return st["images"] / n if n and "labels" in st else None


def _equal_bytes_baseline(exps: dict[str, Experiment]) -> list[tuple[int, list[Experiment], int]]:
    """(ipc, trials, bytes) of the random-hard preset at every ipc it ran: random real images with hard
    labels, whose storage is their images and classes."""
    by_ipc: dict[int, dict[int, Experiment]] = {}
    for e in exps.values():
        kind, value, e_ipc = parse_name(e.name) or (None, None, None)
        if kind == "random-hard" and value is None and e.storage and "labels" in e.storage:
            _keep_newest(by_ipc.setdefault(e_ipc, {}), e)
    return [(i, [t[k] for k in sorted(t)], round(math.fsum(int(e.storage["images"]) for e in t.values()) / len(t)))
            for i, t in sorted(by_ipc.items())]


def _storage_section(ipc: int, exps: dict[str, Experiment], students: list[str], plots_dir: Path | None,
                     md_dir: Path) -> list[str]:
    points = storage_points(ipc, exps)
    if len(points) < 2:
        return []
    cost = next((c for p in points for e in p.trials if (c := _image_cost(e))), None)
    classes = next(((e.relabel or {}).get("images", 0) // ipc for p in points for e in p.trials if e.relabel), 0)
    full = next((p for p in points if p.title == "float16"), None)
    baseline = _equal_bytes_baseline(exps)
    out = [f"## Accuracy against storage at ipc {ipc} (float16 logits down to hard labels)", "",
           "Total bytes of each set as stored (images, labels, plan, container; `reports/relabel.json`); "
           "labels: the label arrays alone per image per training epoch. Test accuracy, mean ± 95 % interval over "
           "the trials, [mean validation accuracy]. *Real images at equal bytes*: how many random real images "
           "with hard labels the same bytes hold" + (f" ({cost:.0f} bytes each)" if cost else "")
           + "; the random-hard preset's rows below give their accuracy. *Rule*: the point's mean validation accuracy "
           "is not below that of float16 logits of every epoch by more than the float16 point's standard deviation "
           "over its trials, on every student (how the default was chosen; docs/format.md).", "",
           "| labels | trials | stored MB | label bytes per image per epoch | real images at equal bytes | "
           + " | ".join(students) + " | rule | experiments |",
           "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in students) + " | --- | --- |"]
    for p in points:
        st = p.trials[0].storage
        per = 0 if p.title.startswith("hard labels") else st.get("per_image_epoch", {}).get(
            "labels", st.get("soft_labels_per_image_epoch", 0))
        real = f"{int(p.bytes // cost)}" + (f" (ipc {p.bytes / cost / classes:.1f})" if classes else "") \
            if cost else "-"
        rule = "-" if full is None or p is full else {True: "yes", False: "no", None: "-"}[
            within_validation_rule(p, full, students)]
        out.append(f"| {p.title} | {len(p.trials)} | {p.bytes / 1e6:.3f} | {per:.2f} | {real} | "
                   + " | ".join(_trials_acc(p.trials, s) for s in students) + f" | {rule} | {p.names} |")
    for b_ipc, trials, total in baseline:
        out.append(f"| random real images, hard labels, ipc {b_ipc} | {len(trials)} | {total / 1e6:.3f} | 0.00 | "
                   f"{(trials[0].relabel or {}).get('images', '-')} | "
                   + " | ".join(_trials_acc(trials, s) for s in students) + " | - | "
                   + StoragePoint("", trials, total).names + " |")
    out.append("")
    if plots_dir is not None:
        png = plots_dir / f"storage-ipc{ipc}.png"
        with _figure(png, f"accuracy against storage, ipc {ipc}", "stored MB (log)", legend_size=6) as ax:
            for s in students:  # points only: settings of different kinds, no curve between them
                pts = [(p.bytes / 1e6, acc) for p in points if (acc := _over_trials(p.trials, s))]
                ax.errorbar([x for x, _ in pts], [100 * m for _, (m, _) in pts],
                            yerr=[100 * (h or 0.0) for _, (_, h) in pts], marker="o", linestyle="none", capsize=3,
                            label=s)
                real = [(t / 1e6, acc) for i, trials, t in baseline if (acc := _over_trials(trials, s))]
                if real:
                    ipcs = "/".join(str(i) for i, trials, _ in baseline if _over_trials(trials, s))
                    ax.errorbar([x for x, _ in real], [100 * m for _, (m, _) in real],
                                yerr=[100 * (h or 0.0) for _, (_, h) in real], marker="s", linestyle="--",
                                capsize=3, label=f"{s}: real images, hard labels (random-hard, ipc {ipcs})")
            for p in points:
                first = next((a for s in students if (a := _over_trials(p.trials, s))), None)
                if first:
                    ax.annotate(p.title, (p.bytes / 1e6, 100 * first[0]), fontsize=6)
            ax.set_xscale("log")
        out += [f"![accuracy against storage at ipc {ipc}]({Path(os.path.relpath(png, md_dir)).as_posix()})", ""]
    return out


def _applications(exps: list[Experiment], plots_dir: Path | None, md_dir: Path) -> list[str]:
    """One table and one plot per application, over the experiments that ran it enabled."""
    out: list[str] = []
    cont = [e for e in exps if e.continual]
    if cont:
        first = cont[0].continual["steps"]
        heads = [f"{s['classes_seen']} classes" for s in first if s["labels"] == first[0]["labels"]]
        out += ["## Continual learning (class-incremental; accuracy on the classes seen so far)", "",
                "| experiment | labels | " + " | ".join(heads) + " |", "| --- | --- |" + " --- |" * len(heads)]
        series = []
        for e in cont:
            for kind in dict.fromkeys(s["labels"] for s in e.continual["steps"]):
                steps = [s for s in e.continual["steps"] if s["labels"] == kind]
                out.append(f"| {e.name} | {kind} | " + " | ".join(
                    f"{100 * s['acc_mean']:.2f} ± {100 * s['acc_std']:.2f}" for s in steps) + " |")
                series.append((f"{e.name} ({kind})", [s["classes_seen"] for s in steps],
                               [100 * s["acc_mean"] for s in steps]))
        out.append("")
        if plots_dir is not None:
            out += _line_plot(plots_dir / "continual.png", md_dir, "continual learning", "classes seen", series)
    slim = [e for e in exps if e.slimming]
    if slim:
        out += ["## Slimming (test accuracy before -> after recovery on the condensed set alone)", "",
                "| experiment | model (unpruned) | pruned | network slimming (BN scale) | weight magnitude |",
                "| --- | --- | --- | --- | --- |"]
        series = []
        for e in slim:
            s = e.slimming
            for r in s["results"]:
                cells = [f"{100 * r[f'{k}_before']:.2f} -> {100 * r[f'{k}_after']:.2f}" if f"{k}_after" in r else "-"
                         for k in ("bn", "magnitude")]
                out.append(f"| {e.name} | {s['model']} ({100 * s['unpruned_acc']:.2f}) | {100 * r['ratio']:.0f}% | "
                           + " | ".join(cells) + " |")
            for k in ("bn", "magnitude"):
                pts = [(r["ratio"], 100 * r[f"{k}_after"]) for r in s["results"] if f"{k}_after" in r]
                if pts:
                    series.append((f"{e.name} {k}", [x for x, _ in pts], [y for _, y in pts]))
        out.append("")
        if plots_dir is not None:
            out += _line_plot(plots_dir / "slimming.png", md_dir, "slimming, after recovery", "share pruned", series)
    return out


def _line_plot(png: Path, md_dir: Path, title: str, xlabel: str,
               series: list[tuple[str, list[float], list[float]]]) -> list[str]:
    with _figure(png, title, xlabel, legend_size=7) as ax:
        for name, xs, ys in series:
            ax.plot(xs, ys, marker="o", label=name)
    return [f"![{title}]({Path(os.path.relpath(png, md_dir)).as_posix()})", ""]


# --- the field's metrics over trials (docs/metrics.md) -----------------------------------------------

# The evaluation protocol: what a student's training on a set depends on besides the set and its
# labels. IOR pairs a method with random-soft only where these are equal.
PROTOCOL_KEYS = ("zeta", "evaluate", "relabel.teachers", "relabel.batch_size", "relabel.epochs", "relabel.min_steps",
                 "relabel.aug", "relabel.cutmix")


def t_interval(values: list[float]) -> tuple[float, float | None]:
    """Mean of ``values`` and the half-width of its 95 % Student-t confidence interval,
    t(0.975, n - 1) * s / sqrt(n) with s the sample standard deviation; None for fewer than two."""
    from scipy.stats import t

    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    s = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(t.ppf(0.975, n - 1)) * s / math.sqrt(n)


def protocol(params: dict[str, Any]) -> str:
    """The evaluation protocol of an experiment's params, as canonical JSON (labels and variants are
    the method's and the report's, not the protocol's)."""
    values = {k: get_dotted(params, k) for k in PROTOCOL_KEYS}
    values["evaluate"] = {k: v for k, v in (values["evaluate"] or {}).items() if k not in ("labels", "variants")}
    return json.dumps(values, sort_keys=True, default=str)


def method_trials(exps: dict[str, Experiment]) -> dict[tuple[str, int], dict[int, Experiment]]:
    """{(preset, ipc): {trial: experiment}} over the presets' experiments (``edc-ipc1``, ``edc-ipc1-t3``),
    the newest per trial; the trial is the experiment's ``trial`` param."""
    out: dict[tuple[str, int], dict[int, Experiment]] = {}
    for e in exps.values():
        kind, value, ipc = parse_name(e.name)
        if value is not None or kind not in PRESET_HELP:
            continue
        _keep_newest(out.setdefault((kind, ipc), {}), e)
    return out


def hard_acc(e: Experiment, student: str) -> float | None:
    """The set's accuracy with hard labels: the main result under evaluate.labels hard (or a set stored
    with hard labels, relabel.codec hard), else the ``hard`` evaluation variant; None when neither ran."""
    m = e.metrics.get(student) or {}
    if get_dotted(e.params, "evaluate.labels") == "hard" or get_dotted(e.params, "relabel.codec") == "hard":
        return m.get("acc_mean")
    return ((m.get("variants") or {}).get("hard") or {}).get("acc_mean")


def noaug_acc(e: Experiment, student: str) -> float | None:
    m = e.metrics.get(student) or {}
    return ((m.get("variants") or {}).get("noaug") or {}).get("acc_mean")


@dataclass
class Evidence:
    """One (method, ipc, student) over its trials; accuracies as fractions, intervals as half-widths."""
    trials: list[int]
    seeds: int
    acc: tuple[float, float | None]
    ior: tuple[float, float | None] | None = None  # None: no random-soft trial under the same protocol
    ior_trials: int = 0
    hlr: tuple[float, float | None] | None = None
    aug: tuple[float, float] | None = None  # (with, without) augmentation, means over the trials that have both
    val: float | None = None


def evidence(trials: dict[int, Experiment], base: dict[int, Experiment] | None, student: str) -> Evidence | None:
    """The metrics of docs/metrics.md for one student over a method's ``trials`` ({trial: experiment}),
    IOR against ``base`` (random-soft's trials at the same ipc)."""
    have = {t: e for t, e in sorted(trials.items()) if student in e.metrics}
    if not have:
        return None
    accs = {t: e.metrics[student]["acc_mean"] for t, e in have.items()}
    out = Evidence(list(have), max(len(e.metrics[student].get("seeds", {})) for e in have.values()),
                   t_interval(list(accs.values())))
    vals = [e.metrics[student]["val_acc_mean"] for e in have.values() if "val_acc_mean" in e.metrics[student]]
    out.val = math.fsum(vals) / len(vals) if len(vals) == len(have) else None
    pairs = [accs[t] - b.metrics[student]["acc_mean"] for t, b in sorted((base or {}).items())
             if t in have and student in b.metrics and protocol(b.params) == protocol(have[t].params)]
    if pairs:
        out.ior, out.ior_trials = t_interval(pairs), len(pairs)
    hlr = [e.reference[student]["acc_mean"] - hard_acc(e, student) for e in have.values()
           if e.reference and student in e.reference and hard_acc(e, student) is not None]
    if hlr:
        out.hlr = t_interval(hlr)
    both = [(accs[t], noaug_acc(e, student)) for t, e in have.items() if noaug_acc(e, student) is not None]
    if both:
        out.aug = (math.fsum(a for a, _ in both) / len(both), math.fsum(b for _, b in both) / len(both))
    return out


def _trials_cell(ev: Evidence) -> str:
    """How many trials, which, and the student seeds each: "3: 0,1,2 (1 seed)"."""
    return f"{len(ev.trials)}: {','.join(map(str, ev.trials))} ({_seeds(ev.seeds)})"


def _seeds(n: int) -> str:
    return f"{n} seed" + ("s" if n != 1 else "")


def _ci(value: tuple[float, float | None] | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    mean, half = value
    text = f"{100 * mean:+.2f}" if signed else f"{100 * mean:.2f}"
    return text + (f" ± {100 * half:.2f}" if half is not None else " (1 trial)")


def _unseen(e: Experiment, student: str) -> bool:
    """Whether the student's architecture is none of the observers' (the set never saw its family)."""
    arch = next((s.get("arch") for s in get_dotted(e.params, "evaluate.students") or [] if s.get("name") == student),
                None)
    return arch is not None and arch not in {m.get("arch") for m in get_dotted(e.params, "observers.models") or []}


def _unseen_line(groups: dict[tuple[str, int], dict[int, Experiment]]) -> str:
    """Which students the sets never saw (an architecture none of the observers has), in words."""
    first: dict[str, Experiment] = {}
    for key in sorted(groups):
        for _, e in sorted(groups[key].items()):
            for student in e.metrics:
                first.setdefault(student, e)
    unseen = [s for s, e in first.items() if _unseen(e, s)]
    seen = [s for s in first if s not in unseen]
    if not unseen:
        return f"Every student ({', '.join(seen)}) shares an architecture with an observer: no student is unseen."
    return (f"Unseen students (an architecture none of the observers has): {', '.join(unseen)}; "
            f"the others ({', '.join(seen) or 'none'}) share one with an observer.")


def _ior_plot(png: Path, md_dir: Path, ipc: int,
              points: dict[str, list[tuple[str, tuple[float, float | None]]]]) -> list[str]:
    """IOR with its 95 % interval per method (a series) and student (the x axis), zero drawn: where a bar
    crosses the line, the method is not shown to beat random-soft on that student."""
    students = list(dict.fromkeys(s for pts in points.values() for s, _ in pts))
    title = f"IOR vs random-soft at ipc {ipc}"
    with _figure(png, title, "student", ylabel="IOR (points, 95 % interval)") as ax:
        ax.axhline(0, color="black", linewidth=0.8)
        width = 0.8 / max(len(points), 1)
        for i, (method, pts) in enumerate(points.items()):
            xs = [students.index(s) - 0.4 + width * (i + 0.5) for s, _ in pts]
            ax.errorbar(xs, [100 * m for _, (m, _) in pts], yerr=[100 * (h or 0) for _, (_, h) in pts], marker="o",
                        linestyle="none", capsize=3, label=method)
        ax.set_xticks(range(len(students)), students)
    return [f"![{title}]({Path(os.path.relpath(png, md_dir)).as_posix()})", ""]


def _evidence_section(exps: dict[str, Experiment], plots_dir: Path | None = None,
                      md_dir: Path = Path(".")) -> list[str]:
    groups = method_trials(exps)
    if not groups:
        return []
    out = ["## The field's metrics over trials (docs/metrics.md)", "",
           "Per method, ipc and student: test accuracy, mean over trials (each trial's value is the mean over its "
           "student seeds) ± the half-width of the 95 % t-interval; **IOR** = accuracy - random-soft's in the same "
           "trial under the same protocol, mean ± 95 % interval over the paired trials; **HLR** = full-data "
           "accuracy (stage reference) - the set's accuracy, hard labels both; accuracy with / without the "
           "students' augmentation (evaluation variant noaug). `-`: not measured (IOR needs random-soft trials "
           "under the same protocol, HLR reference.enabled and evaluate.variants hard, the pair variant noaug). "
           "*unseen*: an architecture none of the observers has.", ""]
    out += [_unseen_line(groups), ""]
    for ipc in sorted({ipc for _, ipc in groups}):
        rows, iors = [], {}
        for method in PRESET_HELP:
            trials = groups.get((method, ipc))
            if not trials:
                continue
            for student in _students(list(trials.values())):
                ev = evidence(trials, groups.get((BASELINE, ipc)), student)
                if ev is None:
                    continue
                if method != BASELINE and ev.ior is not None:
                    iors.setdefault(method, []).append((student, ev.ior))
                first = trials[ev.trials[0]]
                name = f"{student} *(unseen)*" if _unseen(first, student) else student
                ior = "0 (the baseline)" if method == BASELINE else _ci(ev.ior, signed=True) + (
                    f" ({ev.ior_trials} paired)" if ev.ior is not None and ev.ior_trials != len(ev.trials) else "")
                aug = f"{100 * ev.aug[0]:.2f} / {100 * ev.aug[1]:.2f}" if ev.aug else "-"
                val = f"{100 * ev.val:.2f}" if ev.val is not None else "-"
                rows.append(f"| {method} | {name} | {_trials_cell(ev)} | "
                            f"{_ci(ev.acc)} | {ior} | {_ci(ev.hlr, signed=True)} | {aug} | {val} |")
        if rows:
            out += [f"### ipc {ipc}", "",
                    "| method | student | trials: which (seeds each) | test acc (95 % CI) | "
                    "IOR vs random-soft (95 % CI) | HLR (95 % CI) | acc with / without aug | val acc |",
                    "| --- | --- | --- | --- | --- | --- | --- | --- |", *rows, ""]
            # a trial run with -S overrides of its preset's recipe must not pass for the preset
            out += _preset_notes([(method, e) for method in PRESET_HELP
                                  for _, e in sorted(groups.get((method, ipc), {}).items())])
            if iors and plots_dir is not None:
                out += _ior_plot(plots_dir / f"ior-ipc{ipc}.png", md_dir, ipc, iors)
    refs = {}
    for trials in groups.values():
        for e in trials.values():
            for student, m in (e.reference or {}).items():
                refs.setdefault((protocol(e.params), student), m)
    if refs:
        out += ["Full-data reference (whole train split, hard labels, stage reference): " + "; ".join(
            f"{s} {100 * m['acc_mean']:.2f} ± {100 * m['acc_std']:.2f}" for (_, s), m in sorted(refs.items(),
                                                                                            key=lambda kv: kv[0][1]))
                + " (mean ± std over seeds).", ""]
    return out


def build_report(exps: dict[str, Experiment], plots_dir: Path | None, md_dir: Path = Path("."),
                 head: list[str] | None = None) -> str:
    """The markdown report (to be saved in ``md_dir``); writes one plot per sweep into ``plots_dir``.
    ``head``: lines placed under the title (the results page's provenance and headline)."""
    if not exps:
        return ("# Results\n\nNo experiments found. Run a preset or a sweep first, e.g. `edc exp preset edc`, "
                "`edc exp sweep alpha`.\n")
    ordered = sorted(exps.values(), key=lambda e: e.name)
    students = _students(ordered)
    out = ["# Results", "", *(head or []),
           "Test top-1 accuracy (%) of the students trained on each condensed set, mean ± std over seeds.",
           "Each row is a DVC experiment (`dvc exp show`); `(!)` marks a value MLflow disagrees with.",
           "With EMA evaluation (the edc preset) the evaluated model is the EMA of the weights; `(raw x)` is the "
           "mean accuracy of the raw weights of the same runs. `[val x]` is the evaluated model's mean accuracy "
           "on the validation split (dataset.val_size), the only number a sweep's choice looks at.", ""]
    ipcs = sorted({parse_name(e.name)[2] for e in ordered})
    out += _evidence_section(exps, plots_dir, md_dir)
    trials = method_trials(exps)
    for ipc in ipcs:
        rows = [(m, exps.get(f"{m}-ipc{ipc}")) for m in PRESET_HELP]
        rows = [(m, e) for m, e in rows if e is not None]
        if rows:
            seeds = sorted({e.seeds for _, e in rows})
            out += [f"## Methods at ipc {ipc} (Table 1; {'/'.join(map(str, seeds))} seeds)", ""]
            out += _table("method", rows, students) + [""]
            # the evidence section notes the experiments it holds already
            out += _preset_notes([(m, e) for m, e in rows if trials.get((m, ipc), {}).get(e.trial) is not e])
    for sweep, s in SWEEPS.items():
        if sweep in STORAGE_SWEEPS:  # their own section, over trials (_storage_section)
            continue
        for ipc in ipcs:
            if sweep == "ipc":
                points = [(str(i), exps[f"edc-ipc{i}"]) for i in ipcs if f"edc-ipc{i}" in exps]
            else:
                points = _sweep_points(sweep, ipc, exps)
            if len(points) < 2 or (sweep == "ipc" and ipc != ipcs[0]):
                continue
            title = f"{s.key} sweep" + ("" if sweep == "ipc" else f" at ipc {ipc}")
            out += [f"## {title} ({s.help})", ""]
            out += _table(s.key, [(f"{s.key} = {v}", e) for v, e in points], students) + [""]
            best = best_on_validation(points)
            line = (f"Best on the validation split: **{s.key} = {best[0]}** (mean validation accuracy over the "
                    f"students {100 * best[1]:.2f} %)." if best else
                    "No validation accuracy in these experiments (dataset.val_size: 0): no value is chosen.")
            if best and sweep != "ipc":
                line += _against_default(points, best, exps.get(f"edc-ipc{ipc}"))
            out += [line, ""]
            if plots_dir is not None:
                png = plots_dir / (f"{sweep}.png" if sweep == "ipc" else f"{sweep}-ipc{ipc}.png")
                _plot(png, title, s.key, points, students)
                out += [f"![{title}]({Path(os.path.relpath(png, md_dir)).as_posix()})", ""]
    for ipc in ipcs:
        out += _storage_section(ipc, exps, students, plots_dir, md_dir)
    out += _applications(ordered, plots_dir, md_dir)
    out += ["## Experiments", "", "| experiment | DVC rev | created | MLflow post_evaluate run |",
            "| --- | --- | --- | --- |"]
    for e in ordered:
        run = e.mlflow_run or "none (restored from the run-cache?)"
        if e.mlflow_ok is False:
            run += " (differs)"
        out.append(f"| {e.name} | {e.rev[:7]} | {e.timestamp} | {run} |")
    return "\n".join(out) + "\n"


# --- the results page (docs/results.md) and its headline, the same block in README.md ------------------

HEADLINE_START = "<!-- results-headline:start -->"
HEADLINE_END = "<!-- results-headline:end -->"
HEADLINE_FIRST = ("edc", BASELINE)  # the headline's first rows; the other presets follow in PRESET_HELP's order
MEASUREMENT_KEYS = ("evaluate.seeds", "evaluate.variants", "reference.enabled")  # what a trial measures besides a set


def commits(exps: list[Experiment]) -> str:
    """The commit(s) the experiments ran on, as a phrase: "commit `301afdb`", or with several "commits
    `301afdb` (40 experiments), `9d8912f` (edc-ipc10)" (names where they are few)."""
    by_commit: dict[str, list[str]] = {}
    for e in exps:
        by_commit.setdefault(e.baseline[:7] or "unknown", []).append(e.name)
    if len(by_commit) == 1:
        return f"commit `{next(iter(by_commit))}`"
    parts = []
    for rev, names in sorted(by_commit.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        parts.append(f"`{rev}` ({', '.join(sorted(names)) if len(names) <= 3 else f'{len(names)} experiments'})")
    return "commits " + ", ".join(parts)


def ior_verdict(ior: tuple[float, float | None] | None) -> str:
    """Where IOR's 95 % interval lies against zero, judged on the values the tables print (percent, two
    decimals) so that the words never contradict a row: "above zero", "below zero", "includes zero",
    "one trial" (no interval) or "not measured"."""
    if ior is None:
        return "not measured"
    mean, half = ior
    if half is None:
        return "one trial"
    low, high = round(100 * mean, 2) - round(100 * half, 2), round(100 * mean, 2) + round(100 * half, 2)
    return "above zero" if low > 0 else "below zero" if high < 0 else "includes zero"


_VERDICT_WORDS = {  # verdict -> how the sentence says it, in this order
    "above zero": "is above zero on {} (edc beats random-soft there)",
    "includes zero": "includes zero on {} (no evidence that edc beats random-soft there)",
    "below zero": "is below zero on {} (edc is worse than random-soft there)",
    "one trial": "has no interval on {} (one paired trial)",
    "not measured": "is not measured on {} (no random-soft trial under the same protocol)",
}


def ior_sentence(iors: dict[str, tuple[float, float | None] | None], ipc: int) -> str:
    """One plain sentence on edc's IOR interval per student: where it includes zero, the README says so."""
    by_verdict: dict[str, list[str]] = {}
    for student, ior in iors.items():
        by_verdict.setdefault(ior_verdict(ior), []).append(student)
    parts = [words.format(", ".join(by_verdict[v])) for v, words in _VERDICT_WORDS.items() if v in by_verdict]
    return f"At ipc {ipc}, edc's IOR interval " + "; it ".join(parts) + "."


def headline(exps: dict[str, Experiment]) -> list[str]:
    """The short table of the README and the results page: every preset's trials at the smallest ipc
    (1 when present), per student test accuracy and IOR with their 95 % intervals, the commit(s) they
    ran on, and the sentence on edc's IOR. Empty without trials."""
    groups = method_trials(exps)
    if not groups:
        return []
    ipc = min(i for _, i in groups)
    methods = [m for m in (*HEADLINE_FIRST, *(m for m in PRESET_HELP if m not in HEADLINE_FIRST))
               if (m, ipc) in groups]
    ran = [e for m in methods for _, e in sorted(groups[m, ipc].items())]
    students = _students(ran)
    names = [f"{s} *(unseen)*" if any(_unseen(e, s) for e in ran if s in e.metrics) else s for s in students]
    out = [f"Test accuracy (%) at ipc {ipc}, mean ± 95 % interval over trials, and IOR, the paired gain over "
           f"random-soft in the same trial (± 95 % interval), on {commits(ran)}:", "",
           "| method | trials | " + " | ".join(f"{n} | IOR {s}" for n, s in zip(names, students)) + " |",
           "| --- | --- |" + " --- | --- |" * len(students)]
    edc_ior: dict[str, tuple[float, float | None] | None] = {}
    for method in methods:
        cells, counts = [], set()
        for student in students:
            ev = evidence(groups[method, ipc], groups.get((BASELINE, ipc)), student)
            if ev is None:
                cells += ["-", "-"]
                continue
            counts.add(f"{len(ev.trials)} × {_seeds(ev.seeds)}")
            cells += [_ci(ev.acc), "0 (baseline)" if method == BASELINE else _ci(ev.ior, signed=True)]
            if method == "edc":
                edc_ior[student] = ev.ior
        out.append(f"| {method} | {' / '.join(sorted(counts))} | " + " | ".join(cells) + " |")
    out += ["", ior_sentence(edc_ior, ipc) if edc_ior else f"No edc trials at ipc {ipc}: nothing to say about IOR."]
    return out


def headline_block(text: str, source: str) -> str:
    """The lines between the headline markers of ``text`` (a file's content, named ``source`` in errors)."""
    start, end = text.find(HEADLINE_START), text.find(HEADLINE_END)
    if start < 0 or end < start or text.count(HEADLINE_START) != 1 or text.count(HEADLINE_END) != 1:
        raise EdcError(f"{source}: needs one {HEADLINE_START} line and, after it, one {HEADLINE_END} line "
                       "around the results headline")
    return text[start + len(HEADLINE_START):end].strip("\n")


def with_headline(text: str, block: str, source: str) -> str:
    """``text`` with the lines between its headline markers replaced by ``block``."""
    headline_block(text, source)  # the markers' check
    start, end = text.index(HEADLINE_START) + len(HEADLINE_START), text.index(HEADLINE_END)
    return text[:start] + "\n" + block + "\n" + text[end:]


def _rerun_commands(exps: dict[str, Experiment]) -> list[str]:
    """The commands that make the page's trials again on their commit: one `edc exp preset` per method
    and ipc with its trial count and measurements, then the queue and the page."""
    lines = []
    for (method, ipc), trials in sorted(method_trials(exps).items(),
                                        key=lambda kv: (kv[0][1], list(PRESET_HELP).index(kv[0][0]))):
        def sets(e: Experiment) -> str:
            return " ".join(_set_arg(e.params, k) for k in MEASUREMENT_KEYS if get_dotted(e.params, k) is not None)

        first = sets(trials[min(trials)])
        lines.append(f"edc exp preset {method} --ipc {ipc} --trials {max(trials) + 1} --queue {first}")
        # trials measured otherwise (e.g. variants on some trials only): the queued command above measures
        # them like the first; these lines say how they ran, so that a rerun can match the page
        others = {t: sets(e) for t, e in sorted(trials.items()) if sets(e) != first}
        for value in dict.fromkeys(others.values()):
            which = ",".join(str(t) for t, v in others.items() if v == value)
            lines.append(f"#   {method}-ipc{ipc} trials {which} ran with {value}")
    return lines + _sweep_rerun_commands(exps)


def _sweep_rerun_commands(exps: dict[str, Experiment]) -> list[str]:
    """One `edc exp sweep NAME --ipc I --values V` per sweep point, with its trials and measurements, and
    as -S the keys where the point differs from the edc preset as it stands now besides the swept one (a
    default changed since it ran, an extra override), so that the command remakes it on today's code."""
    points: dict[tuple[str, str, int], dict[int, Experiment]] = {}
    suffixed: set[tuple[str, str, int]] = set()
    for e in exps.values():
        kind, value, ipc = parse_name(e.name) or (None, None, None)
        if kind in SWEEPS and value is not None and kind != "ipc":
            _keep_newest(points.setdefault((kind, value, ipc), {}), e)
            if e.name != f"{kind}-{value}-ipc{ipc}":
                suffixed.add((kind, value, ipc))
    lines = []
    for (sweep, value, ipc), trials in sorted(points.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        e = trials[min(trials)]
        try:
            differ = preset_differences("edc", e.params)
        except EdcError:
            differ = {}
        extra = [_set_arg(e.params, k) for k in differ if k != SWEEPS[sweep].key]
        sets = [_set_arg(e.params, k) for k in MEASUREMENT_KEYS if get_dotted(e.params, k) is not None]
        count = f" --trials {max(trials) + 1}" if (sweep, value, ipc) in suffixed else ""
        lines.append(" ".join([f"edc exp sweep {sweep} --ipc {ipc} --values {shlex.quote(value)}{count} --queue",
                               *sets, *extra]))
    return lines


def results_page(exps: dict[str, Experiment], plots_dir: Path | None, md_dir: Path, command: str,
                 readme: str | None = None) -> str:
    """docs/results.md: where the numbers come from (commits, the command that made the page, how to
    rerun the experiments), the headline between its markers (the block the command also writes into
    ``readme``), then :func:`build_report`'s sections."""
    if not exps:
        return build_report(exps, plots_dir, md_dir)
    ordered = sorted(exps.values(), key=lambda e: e.name)
    revs = sorted({e.baseline[:7] for e in ordered if e.baseline})
    head = [f"Made by `{command}` from {len(ordered)} experiments of `dvc exp show -A`, which ran on "
            f"{commits(ordered)}. That command rewrites the page whole; the same experiments give the same "
            "bytes.", ""]
    block = headline(exps)
    if block:
        note = [f"{readme} shows the same block, written by the same command.", ""] if readme else []
        head += ["## Headline", "", *note, HEADLINE_START, *block, HEADLINE_END, ""]
    rerun = _rerun_commands(exps)
    if rerun:
        checkout = [f"git checkout {revs[0]}"] if len(revs) == 1 else \
            [f"# on each commit of the header ({', '.join(revs)}), the rows that ran there"]
        head += ["## Rerunning the experiments", "",
                 "The trials, on the commit they ran on (each trial redraws the initial images, synthesis, the relabel "
                 "plan and the student seeds; docs/metrics.md):", "", "```bash", *checkout, *rerun,
                 "edc queue start -j 2", command, "```", ""]
    return build_report(exps, plots_dir, md_dir, head)
