"""The pipeline's own overhead: the share of a forced `dvc repro`'s wall time spent outside the
stages' compute loops, itemised (DVC, stage start-up and imports, MLflow, the rest of each stage's
process: reading inputs, building models, resume fingerprints, writing outputs).

    python benchmarks/overhead.py            # the repository's pipeline as it is: a forced `dvc repro` (6-7 minutes)
    python benchmarks/overhead.py --quick    # a scratch copy on tiny params: checks that it runs, no figures to keep

Each stage process appends its timings to the file ``EDC_TIMING_FILE`` names (edc.stage.record_timing;
never to an output): when it started, when ``stage_main`` began (start-up and imports end there),
its end, the seconds inside its compute loops (every loop that reports progress, the outermost
only, and the evaluation passes: edc.progress.clocked) and the seconds it waited for MLflow at its
end. DVC's own time is the wall time outside the stage processes. Run from the repository root
after `make repro`, with a clean workspace: the forced run rewrites every output with the same
bytes and logs its runs to the project's MLflow store.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine_line, need  # noqa: E402


def forced_repro(repo: Path, env: dict, timing: Path) -> float:
    t = time.perf_counter()
    r = subprocess.run(["dvc", "repro", "-f"], cwd=repo, env={**env, "EDC_TIMING_FILE": str(timing)},
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"dvc repro -f failed:\n{r.stdout}\n{r.stderr}")
    return wall


def itemise(wall: float, lines: list[dict]) -> list[tuple[str, float]]:
    """(item, seconds) rows that add up to ``wall``: the compute loops first, then the overhead."""
    loops = sum(d["loops"] for d in lines)
    mlflow = sum(d["mlflow_wait"] for d in lines)
    startup = sum(d["main_start"] - (d["process_start"] or d["main_start"]) for d in lines)
    inside = sum(d["end"] - (d["process_start"] or d["main_start"]) for d in lines)
    return [("stage compute loops", loops),
            ("stage start-up and imports (process start to stage_main)", startup),
            ("MLflow (a stage's wait for its tracking thread at the end)", mlflow),
            ("rest of the stage processes (inputs, models, fingerprints, outputs)", inside - loops - mlflow - startup),
            ("DVC (outside the stage processes: start-up, hashing, cache, dvc.lock)", wall - inside)]


def main() -> None:
    print(machine_line(), flush=True)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a scratch copy on tiny params (checks it runs)")
    args = ap.parse_args()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from throughput import bench_params, make_repo

            repo, env = make_repo(Path(tmp), bench_params(quick=True))
        else:
            repo = ROOT
            need(ROOT / "condensed/shards")
            if subprocess.run(["git", "status", "--porcelain", "params.yaml", "dvc.lock"], cwd=ROOT,
                              capture_output=True, text=True).stdout.strip():
                raise SystemExit("params.yaml or dvc.lock has uncommitted changes; commit or stash them first")
        timing = Path(tmp) / "timing.jsonl"
        wall = forced_repro(repo, env, timing)
        lines = [json.loads(x) for x in timing.read_text().splitlines()]
    print(f"forced dvc repro: {wall:.1f} s wall, {len(lines)} stage processes")
    rows = itemise(wall, lines)
    for name, seconds in rows:
        print(f"  {name:<72} {seconds:7.1f} s  {100 * seconds / wall:5.1f} %")
    overhead = wall - rows[0][1]
    print(f"outside the compute loops: {overhead:.1f} s = {100 * overhead / wall:.1f} % of the wall time   "
          "goal <= 8 %")
    print("  per stage: process s, of which start-up, loops, MLflow wait")
    for d in lines:
        start = d["process_start"] or d["main_start"]
        print(f"    {d['stage']:<16} {d['end'] - start:7.1f} {d['main_start'] - start:7.2f} {d['loops']:7.1f} "
              f"{d['mlflow_wait']:6.2f}")
    if args.quick:
        print("(--quick: tiny settings, the figures mean nothing)")


if __name__ == "__main__":
    main()
