"""Helpers shared by the test modules: tiny params, the stages run as DVC runs them, one subprocess
launcher, small real-format datasets, a toy condensed set, and a throwaway DVC repository.

Fixtures live in conftest.py; test modules import these functions from here, never from each other.
"""

from __future__ import annotations

import copy
import os
import pickle
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edc.data import DatasetFacts, normalize
from edc.io import md5_file
from edc.params import read_yaml
from edc.plan import augment, batches, make_plan
from edc.relabel import teacher_logits
from edc.shards import SHARD_BYTES, CondensedWriter

ROOT = Path(__file__).resolve().parents[1]


def tiny_params() -> dict:
    """The repository's params.yaml shrunk to seconds on a CPU: one small observer, one epoch."""
    p = copy.deepcopy(read_yaml(ROOT / "params.yaml"))
    p["observers"]["models"] = [{"name": "tiny", "arch": "convnet", "kwargs": {"width": 8, "depth": 2,
                                                                               "norm": "batch"}}]
    p["observers"]["epochs"] = 1
    p["observers"]["batch_size"] = 128
    p["ipc"] = 2
    p["init"].update(method="rded", observers=["tiny"], candidates=8, crops=2, factor=2)
    p["synth"].update(observers=["tiny"], iterations=4)
    p["relabel"].update(teachers=["tiny"], epochs=2, batch_size=8, min_steps=0)
    p["dataset"]["val_size"] = 0
    p["evaluate"].update(students=[{"name": "student", "arch": "convnet", "kwargs": {"width": 8, "depth": 2}}],
                         seeds=1, eval_every=1)
    return p


def write_yaml(path: Path, data: dict) -> Path:
    from ruamel.yaml import YAML

    with open(path, "w") as f:
        YAML(typ="safe").dump(data, f)
    return path


# --- running the stages as DVC runs them ------------------------------------------------------------

PIPELINE = ("prepare", "train_observers", "collect_stats", "init", "synthesize", "relabel", "post_evaluate")


def stage(name: str):
    """Stage script ``name``'s ``main``, loaded from stages/ as DVC's ``cmd`` runs it."""
    return runpy.run_path(str(ROOT / "stages" / f"{name}.py"), run_name="edc_test")["main"]


def stage_argv(name: str) -> list[str]:
    """The arguments dvc.yaml's ``cmd:`` gives stage ``name`` (paths relative to the workspace), read
    from dvc.yaml itself so that the tests run the stages exactly as the pipeline does."""
    cmd = shlex.split(read_yaml(ROOT / "dvc.yaml")["stages"][name]["cmd"].replace("${launcher}", "python"))
    script = cmd.index(f"stages/{name}.py")
    return cmd[script + 1:]


ARGS = {name: stage_argv(name) for name in (*PIPELINE, "reference", "continual", "slimming")}


def run_stages(work: Path, params: Path, stages=PIPELINE) -> None:
    """Run ``stages`` in order in workspace ``work`` with the params file ``params``: dvc.yaml's
    arguments, each path placed under ``work``."""
    for name in stages:
        argv = [a if a.startswith("--") else str(work / a) for a in ARGS[name]]
        stage(name)(["--params", str(params), *argv])


def md5_tree(root: Path) -> dict[str, str]:
    """{path relative to ``root``: md5} of every file under ``root``."""
    return {str(f.relative_to(root)): md5_file(f) for f in sorted(root.rglob("*")) if f.is_file()}


def _images(rng, n: int, c: int, h: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, c, h, h), dtype=np.uint8)


def make_cifar10(root: Path, per_class: int = 3, test_per_class: int = 2, seed: int = 0) -> Path:
    """The standard CIFAR-10 python layout: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = [f"class{i}" for i in range(10)]
    for b in range(1, 6):
        labels = list(range(10)) * per_class if b == 1 else [b % 10] * 2
        x = _images(rng, len(labels), 3, 32).reshape(len(labels), -1)
        with open(d / f"data_batch_{b}", "wb") as f:
            pickle.dump({b"data": x, b"labels": labels, b"batch_label": b"batch"}, f)
    labels = list(range(10)) * test_per_class
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": _images(rng, len(labels), 3, 32).reshape(len(labels), -1), b"labels": labels}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in names], b"num_vis": 3072}, f)
    return root


def make_cifar100(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for split, reps in (("train", 2), ("test", 1)):
        labels = list(range(100)) * reps
        with open(d / split, "wb") as f:
            pickle.dump({b"data": _images(rng, len(labels), 3, 32).reshape(len(labels), -1),
                         b"fine_labels": labels, b"coarse_labels": [0] * len(labels)}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i:02d}".encode() for i in range(100)],
                     b"coarse_label_names": [b"x"] * 20}, f)
    return root


def make_imagefolder(root: Path, classes=("cat", "dog", "emu"), n: int = 3, size: int | tuple = 12,
                     mode: str = "RGB", seed: int = 0, ext: str = ".png") -> Path:
    """root/{train,val}/<class>/<i><ext> of random pixels; ``size`` (h, w) pairs cycle over the images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(size, size)] if isinstance(size, int) else list(size)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = sizes[i % len(sizes)]
                shape = (h, w, 3) if mode == "RGB" else (h, w)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / split / c / f"{i}{ext}")
    return root


# --- one subprocess launcher ------------------------------------------------------------------------

def run(cmd: list[str], cwd: Path = ROOT, env: dict | None = None, timeout: float = 900,
        ) -> subprocess.CompletedProcess:
    """``cmd`` in a child process, its output captured as text; ``env`` adds to this process's
    environment (None: inherit it). ``timeout`` keeps a hung child from outliving the test."""
    return subprocess.run(cmd, cwd=cwd, env=None if env is None else {**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)


def sh(cmd: list[str], cwd: Path, env: dict) -> str:
    """``cmd`` in ``env`` exactly (a throwaway repository's environment), asserting that it succeeds;
    its stdout and stderr together."""
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def sh_fails(cmd: list[str], cwd: Path, env: dict) -> str:
    """As :func:`sh`, asserting that the command fails."""
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode != 0, f"{' '.join(cmd)} should have failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def run_stage(work: Path, name: str, nproc: int = 1, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    """Stage script ``name`` in workspace ``work`` with its params.yaml and dvc.yaml's arguments, as a
    child process (under torchrun with ``nproc`` > 1, one torch thread per rank); ``env`` adds
    variables (the crash and checkpoint switches)."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    threads = {} if nproc == 1 else {"OMP_NUM_THREADS": "1"}
    return run([*launcher, str(ROOT / "stages" / f"{name}.py"), "--params", "params.yaml", *ARGS[name]], cwd=work,
               env={**threads, **env}, timeout=timeout)


# --- toy data and a toy condensed set --------------------------------------------------------------

# The facts of the toy condensed set below: 4 classes of 3 x 10 x 10 images.
FACTS = DatasetFacts(name="toy", channels=3, height=10, width=10, num_classes=4, class_names=list("abcd"),
                     mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3], counts={"train": [5] * 4, "test": [2] * 4})


def toy_data(n: int = 60, seed: int = 0, classes: int = 3, channels: int = 1, size: int = 12,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` float images (channels, size, size) and labels ``arange(n) % classes``: noise plus a bright
    blob at a different place for each class, so that a small model learns them in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, channels, size, size, generator=g) * 0.3
    half = size // 2
    for c in range(classes):
        r, s = divmod(c, 2)
        x[y == c, :, r * half:(r + 1) * half, s * half:(s + 1) * half] += 2.0
    return x, y


def teachers() -> list[nn.Module]:
    """Two small seeded eval-mode teachers for the toy set (3 channels in, 4 classes out)."""
    torch.manual_seed(0)
    return [nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 4)).eval() for _ in range(2)]


def toy_images(n: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random uint8 images of the toy set and their labels ``arange(n) % 4``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 10, 10), generator=g, dtype=torch.uint8), torch.arange(n) % 4


def write_set(out, epochs=3, batch_size=4, topk=0, cutmix=True, seed=0, images=None, codec="float16", stored=None,
              shard_bytes=SHARD_BYTES):
    """A toy condensed set in ``out`` written by the format's own writer, soft labels from
    :func:`teachers` stored as ``codec``, ``stored`` epochs of them (default all) in label shards of
    ``shard_bytes``; returns each stored epoch's (plan, augmented views) for comparison."""
    out.mkdir(parents=True, exist_ok=True)
    u8, y = images if images is not None else toy_images()
    x = normalize(u8, FACTS)
    meta = {"dataset": FACTS.to_dict(), "class_names": FACTS.class_names, "num_classes": 4, "ipc": 2,
            "teachers": ["t0", "t1"], "epochs": epochs, "batch_size": batch_size, "topk": topk, "cutmix": cutmix,
            "codec": codec, "stored_epochs": stored or epochs, "aug": {"scale_min": 0.3, "flip": True}, "params": {}}
    w = CondensedWriter(out, u8, y, meta, shard_bytes=shard_bytes)
    plans = []
    for e in range(stored or epochs):
        plan = make_plan(len(y), 10, 10, batch_size, 0.3, True, cutmix=cutmix,
                         gen=torch.Generator().manual_seed(seed * 100 + e))
        xa = torch.cat([augment(x[i], c, m) for i, c, m in batches(plan, batch_size)])
        w.write_epoch(e, plan, batch_size, teacher_logits(teachers(), xa), topk)
        plans.append((plan, xa))
    w.close()
    return plans


# --- DVC in a throwaway repository ---------------------------------------------------------------



def make_dvc_repo(tmp_path: Path) -> tuple[Path, dict]:
    """A throwaway git + DVC repository under ``tmp_path`` holding this project's pipeline on tiny
    params, and the environment to run DVC in it."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in ("edc", "stages", "dvc.yaml"):
        src = ROOT / item
        (shutil.copytree(src, repo / item, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy(src, repo / item))
    write_yaml(repo / "params.yaml", tiny_params())
    (repo / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME")}
    # PYTHONPATH: the stages import the copy's edc (the one dvc.yaml hashes), not the editable install's.
    env.update(HOME=str(tmp_path), PATH=f"{Path(sys.executable).parent}:{env['PATH']}", DVC_NO_ANALYTICS="1",
               PYTHONPATH=str(repo),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com")
    sh(["git", "init", "-q", "-b", "main"], repo, env)
    sh(["dvc", "init", "-q"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "init"], repo, env)
    return repo, env


APPS = ("continual", "slimming")  # off by default: they run, write "enabled: false", and log nothing
REFERENCE = "reference"  # HLR's full-data reference, off by default too; reads no set, only data and recipe


def ran(output: str) -> set[str]:
    """The stages a DVC command's output says it ran."""
    return {s for s in (*PIPELINE, *APPS, REFERENCE) if f"Running stage '{s}'" in output}


def lock_outs(repo: Path) -> dict[str, str]:
    """{"stage:path": md5} of every output dvc.lock records."""
    from ruamel.yaml import YAML

    lock = YAML(typ="safe").load((repo / "dvc.lock").read_text())
    return {f"{name}:{o['path']}": o["md5"] for name, s in lock["stages"].items() for o in s.get("outs", [])}


# --- `dvc exp show --json -A` as DVC prints it, for the report's tests ---------------------------------

def preset_params(method: str, **dotted) -> dict:
    """The repository's params.yaml with preset ``method``'s values and the ``dotted`` keys
    (``{"evaluate.seeds": 1}``), as an experiment of that preset holds them."""
    from edc.params import parse_params, set_dotted
    from edc.presets import preset_overrides

    raw = copy.deepcopy(read_yaml(ROOT / "params.yaml"))
    for key, value in {**preset_overrides(method, parse_params(raw)), **dotted}.items():
        set_dotted(raw, key, copy.deepcopy(value))
    return raw


def exp_show_entry(name: str, params: dict, metrics: dict, timestamp: str, reference: dict | None = None) -> dict:
    """One finished experiment of a baseline's ``experiments`` list; ``reference`` is reports/reference.json's
    students."""
    files = {"reports/metrics.json": {"data": metrics}}
    if reference is not None:
        files["reports/reference.json"] = {"data": {"enabled": True, "students": reference}}
    import hashlib

    rev = {"rev": hashlib.sha1(name.encode()).hexdigest(), "name": name,
           "data": {"timestamp": timestamp, "metrics": files, "params": {"params.yaml": {"data": params}}}}
    return {"executor": {"state": "success"}, "name": name, "revs": [rev]}


def trial_metrics(accs: dict[str, float], hard: float | None = None, noaug: float | None = None) -> dict:
    """reports/metrics.json of a one-seed trial: per student its test accuracy, validation accuracy one point
    below, and the ``hard`` / ``noaug`` variants that many points below (None: not run)."""
    out = {}
    for student, acc in accs.items():
        m = {"acc_mean": acc, "acc_std": 0.0, "seeds": {"0": acc}, "val_acc_mean": acc - 0.01, "val_acc_std": 0.0}
        variants = {k: {"acc_mean": acc - d} for k, d in (("hard", hard), ("noaug", noaug)) if d is not None}
        out[student] = {**m, **({"variants": variants} if variants else {})}
    return out


def patch_exp_show(monkeypatch, baselines: list[dict]) -> None:
    """`dvc exp show --json -A` prints ``baselines`` (``[{"rev": COMMIT, "experiments": [...]}]``)."""
    import json

    from edc import report

    monkeypatch.setattr(report, "dvc_command", lambda: "dvc")
    monkeypatch.setattr(report.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, json.dumps(baselines), ""))


SYNTHETIC_COMMIT = "0" * 40  # no real commit: the synthetic trials below ran nowhere
TRIAL_MEASUREMENTS = {"evaluate.seeds": 1, "evaluate.variants": ["hard", "noaug"], "reference.enabled": True}


def synthetic_trials(commit: str = SYNTHETIC_COMMIT) -> list[dict]:
    """`dvc exp show --json -A` of a made-up results run on ``commit``: at ipc 1, five one-seed trials of
    edc and random-soft and three of rded; at ipc 10, three of edc and random-soft. edc's paired
    differences to random-soft at ipc 1 are (percent) +2, +3, +1, +3, +1 on convnet (IOR +2.00 ± 1.24:
    above zero), their negatives on resnet18 (below zero) and -1, +2, -1, +1, -1 on vit (+0.00 ± 1.76:
    includes zero); t(0.975, 4) = 2.776445."""
    accs = {
        ("edc", 1): {"convnet": [.90, .92, .91, .93, .89], "resnet18": [.86, .85, .88, .85, .87],
                     "vit": [.70, .72, .71, .73, .69]},
        ("random-soft", 1): {"convnet": [.88, .89, .90, .90, .88], "resnet18": [.88, .88, .89, .88, .88],
                             "vit": [.71, .70, .72, .72, .70]},
        ("rded", 1): {"convnet": [.85, .86, .84], "resnet18": [.80, .82, .81], "vit": [.60, .61, .62]},
        ("edc", 10): {"convnet": [.97, .98, .97], "resnet18": [.96, .96, .97], "vit": [.90, .91, .92]},
        ("random-soft", 10): {"convnet": [.97, .97, .97], "resnet18": [.96, .95, .96], "vit": [.90, .90, .91]},
    }
    reference = {"convnet": {"acc_mean": .99, "acc_std": .001}, "resnet18": {"acc_mean": .985, "acc_std": .002},
                 "vit": {"acc_mean": .97, "acc_std": .003}}
    exps = []
    for (method, ipc), per_student in accs.items():
        for t in range(len(per_student["convnet"])):
            params = preset_params(method, ipc=ipc, trial=t, **TRIAL_MEASUREMENTS)
            metrics = trial_metrics({s: a[t] for s, a in per_student.items()}, hard=0.3, noaug=0.05)
            exps.append(exp_show_entry(f"{method}-ipc{ipc}-t{t}", params, metrics,
                                       f"2026-12-05T1{ipc % 10}:0{t}:00", reference))
    return [{"rev": "workspace", "name": None, "experiments": None},
            {"rev": commit, "name": "main", "experiments": exps}]
