"""Start-up of each stage: from the process's start to its first batch, against a bare `import torch`.

    python benchmarks/startup.py [--repeats 5] [--stages synthesize relabel ...]

Each stage runs as DVC runs it (its `cmd:` from dvc.yaml, `${launcher}` = this Python) in a scratch
folder where its dvc.yaml dependencies are links to this checkout's files and its outputs are new,
so nothing here is overwritten. With EDC_STARTUP_PROBE set, the stage's first progress loop prints
the time and ends the process (edc/progress.py): what is measured is imports, reading params and
inputs, and opening the MLflow store where that is on the way. Rounds are paired (a bare
`python -c "import torch"` then each stage), and the ratio's median (min-max) is printed.
Target: each stage within 20 % of the bare import (<= 1.2x). A second reference row imports
torch._dynamo as well, which torch's own optimizers import at their first step and torchvision at
its import: what the stages avoid (edc.optim's optimizers, our MobileNet-V2; tests/test_optim.py
pins it). Needs the outputs of `dvc repro`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine_line, need  # noqa: E402

from edc.params import read_yaml  # noqa: E402
from edc.progress import STARTUP_PROBE_ENV  # noqa: E402

DEFAULT_STAGES = ("train_observers", "collect_stats", "synthesize", "relabel", "post_evaluate")


def scratch(stage: str, spec: dict, tmp: Path) -> Path:
    """A folder where ``stage`` can run: its deps and params.yaml linked from ROOT, its outs absent."""
    work = tmp / stage
    for dep in [*spec.get("deps", []), "params.yaml"]:
        dest = work / dep
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            dest.symlink_to(need(ROOT / dep))
    for out in spec.get("outs", []) + spec.get("metrics", []) + spec.get("plots", []):
        name = out if isinstance(out, str) else next(iter(out))
        (work / name).parent.mkdir(parents=True, exist_ok=True)
    return work


def time_to_first_batch(argv: list[str], cwd: Path, env: dict) -> float:
    start = time.time()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(STARTUP_PROBE_ENV)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{shlex.join(argv)} did not reach a first batch (exit {proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return float(lines[0].split()[1]) - start


def bare_import(env: dict, modules: str = "torch") -> float:
    """Process start to the end of ``import <modules>`` (not to the process's exit, which with torch
    loaded takes a while longer)."""
    start = time.time()
    out = subprocess.run([sys.executable, "-c", f"import time, {modules}; print(time.time())"], env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(out.split()[-1]) - start


def main() -> None:
    print(machine_line(), flush=True)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stages", nargs="+", default=list(DEFAULT_STAGES))
    args = ap.parse_args()
    stages = read_yaml(ROOT / "dvc.yaml")["stages"]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, STARTUP_PROBE_ENV: "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        for key in ("DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME"):
            env.pop(key, None)
        runs = {}
        for name in args.stages:
            cmd = " ".join(stages[name]["cmd"].split()).replace("${launcher}", shlex.quote(sys.executable))
            argv = shlex.split(cmd)
            argv[0] = sys.executable if argv[0] == "python" else argv[0]  # the stages that take no launcher
            runs[name] = (argv, scratch(name, stages[name], Path(tmp)))
        for argv, work in runs.values():  # warm-up: file caches, and the store's tables created once
            time_to_first_batch(argv, work, env)
        rounds = []
        for _ in range(args.repeats):
            r = {"bare": bare_import(env), "dynamo": bare_import(env, "torch, torch._dynamo")}
            for name, (argv, work) in runs.items():
                r[name] = time_to_first_batch(argv, work, env)
            rounds.append(r)
    bare = statistics.median(r["bare"] for r in rounds)
    print(f"start-up: process start to first batch, median of {args.repeats} paired rounds; target <= 1.2x")
    label = 'python -c "import torch"'
    print(f"  {label:<40} {bare:7.2f} s")
    dynamo = [r["dynamo"] / r["bare"] for r in rounds]
    print(f"  {'import torch, torch._dynamo (reference)':<40} {statistics.median(r['dynamo'] for r in rounds):7.2f} s  "
          f"{statistics.median(dynamo):5.2f}x: what torch.optim's first step and any torchvision model import")
    for name in runs:
        ratios = [r[name] / r["bare"] for r in rounds]
        print(f"  {name:<40} {statistics.median(r[name] for r in rounds):7.2f} s  "
              f"{statistics.median(ratios):5.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
