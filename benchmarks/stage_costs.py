"""Wall time and peak resident memory of every stage, and how they grow with ipc and the number of
classes. Each stage runs as its own process (as DVC runs it) in a scratch directory; peak memory is
the process's maximum resident set size (``wait4`` rusage), startup included.

    python benchmarks/stage_costs.py                       # reduced settings, K in {5, 10}, ipc in {1, 10, 20}
    python benchmarks/stage_costs.py --params params.yaml  # the params as they are (slow)

Reduced settings (the default) keep every stage but shrink the work so the sweep takes minutes: the
ConvNet observer only, 1 observer epoch, 100 synthesis iterations, 50 relabel/post-evaluation epochs,
one seed. The 5-class dataset is the default data's digits 0-4 (an ``npz`` source).
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine_line  # noqa: E402

from edc.params import read_yaml  # noqa: E402

UPSTREAM = ("prepare", "train_observers", "collect_stats")
PER_IPC = ("init", "synthesize", "relabel", "post_evaluate")


def args_for(stage: str) -> list[str]:
    return {
        "prepare": ["--out", "data/prepared"],
        "train_observers": ["--data", "data/prepared", "--out", "models/observers", "--report",
                            "reports/observers.json", "--plots", "reports/plots/observers"],
        "collect_stats": ["--data", "data/prepared", "--observers", "models/observers", "--out", "stats",
                          "--report", "reports/stats.json"],
        "init": ["--data", "data/prepared", "--observers", "models/observers", "--out", "condensed/init",
                 "--grid", "reports/init_grid.png"],
        "synthesize": ["--data", "data/prepared", "--init", "condensed/init", "--observers", "models/observers",
                       "--stats", "stats", "--out", "condensed/images", "--report", "reports/synth.json",
                       "--curves", "reports/plots/synth_loss.csv", "--grid", "reports/synth_grid.png"],
        "relabel": ["--data", "data/prepared", "--images", "condensed/images", "--observers", "models/observers",
                    "--out", "condensed/shards"],
        "post_evaluate": ["--data", "data/prepared", "--shards", "condensed/shards", "--metrics",
                          "reports/metrics.json", "--curves", "reports/plots/evaluate"],
    }[stage]


def run(stage: str, work: Path, env: dict) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one stage process."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "stages" / f"{stage}.py"), "--params", "params.yaml",
                             *args_for(stage)], cwd=work, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{stage} failed:\n{proc.stderr.read().decode()}")
    return seconds, usage.ru_maxrss / 1024  # Linux reports KiB


def reduced(p: dict) -> dict:
    p = copy.deepcopy(p)
    obs = p["observers"]["models"][0]
    p["observers"]["models"] = [obs]
    p["observers"]["epochs"] = 1
    p["init"]["observers"] = [obs["name"]]
    p["synth"].update(observers=[obs["name"]], iterations=100)
    p["relabel"].update(teachers=[obs["name"]], epochs=50)
    p["evaluate"].update(students=p["evaluate"]["students"][:1], seeds=1)
    return p


def five_class_npz(path: Path) -> Path:
    from edc.data.sources import read_source
    from edc.params import DatasetParams

    src = read_source(DatasetParams(name="mnist5k", test_size=1000), seed=0)
    images = np.concatenate([src.train.images, src.test.images])
    labels = np.concatenate([src.train.labels, src.test.labels])
    keep = labels < 5
    x, y = images[keep][:, 0], labels[keep]
    np.savez(path, x_train=x, y_train=y, class_names=np.array([str(i) for i in range(5)]))
    return path


def main() -> None:
    print(machine_line(), flush=True)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", help="run these params as they are (default: params.yaml, reduced)")
    ap.add_argument("--ipcs", type=int, nargs="+", default=[1, 10, 20])
    ap.add_argument("--classes", type=int, nargs="+", default=[5, 10], choices=[5, 10])
    args = ap.parse_args()
    from ruamel.yaml import YAML

    base = read_yaml(args.params or ROOT / "params.yaml")
    if not args.params:
        base = reduced(base)
    print(f"torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}, cpus: {os.cpu_count()}; "
          f"{'params as given' if args.params else 'reduced settings'}")
    print(f"  {'stage':<16} {'K':>3} {'ipc':>4} {'images':>7} {'seconds':>8} {'peak RSS MiB':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        for k in args.classes:
            work = Path(tmp) / f"k{k}"
            work.mkdir()
            p = copy.deepcopy(base)
            if k == 5:
                p["dataset"] = {"name": "npz", "root": str(five_class_npz(work / "digits04.npz")), "test_size": 500}
            for ipc in args.ipcs:
                p["ipc"] = ipc
                with open(work / "params.yaml", "w") as f:
                    YAML(typ="safe").dump(p, f)
                for stage in (UPSTREAM if ipc == args.ipcs[0] else ()) + PER_IPC:
                    seconds, rss = run(stage, work, env)
                    n = "" if stage in UPSTREAM else str(k * ipc)
                    print(f"  {stage:<16} {k:>3} {ipc if n else '':>4} {n:>7} {seconds:8.1f} {rss:13.0f}",
                          flush=True)


if __name__ == "__main__":
    main()
