"""DVC's own overhead on this project: a no-op `dvc repro`, and `dvc exp run -S zeta=1.5` against
running the post_evaluate stage script alone with the same params.

    python benchmarks/dvc_overhead.py [--repeats 3]

Run from the repository root after `make repro`, with a clean workspace (it restores params.yaml,
dvc.lock and the outputs afterwards and removes the experiment it makes).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine_line, need  # noqa: E402

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=ENV, check=True, capture_output=True, text=True)
    return time.perf_counter() - t


def main() -> None:
    print(machine_line(), flush=True)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    need(ROOT / "condensed/shards")
    if subprocess.run(["git", "status", "--porcelain", "params.yaml", "dvc.lock"], cwd=ROOT, capture_output=True,
                      text=True).stdout.strip():
        raise SystemExit("params.yaml or dvc.lock has uncommitted changes; commit or stash them first")
    noop = sorted(timed(["dvc", "repro"]) for _ in range(args.repeats))[args.repeats // 2]
    print(f"no-op dvc repro (median of {args.repeats}): {noop:.2f} s   target < 5 s")

    with tempfile.TemporaryDirectory() as tmp:
        params = Path(tmp) / "params.yaml"
        params.write_text((ROOT / "params.yaml").read_text().replace("zeta: 2.0", "zeta: 1.5"))
        alone = timed([sys.executable, "stages/post_evaluate.py", "--params", str(params), "--data", "data/prepared",
                       "--shards", "condensed/shards", "--metrics", f"{tmp}/m.json", "--curves", f"{tmp}/curves"])
    try:
        exp = timed(["dvc", "exp", "run", "-S", "zeta=1.5", "-n", "bench-zeta"])
    finally:
        subprocess.run(["git", "checkout", "--", "params.yaml", "dvc.lock"], cwd=ROOT, env=ENV, check=True)
        subprocess.run(["dvc", "checkout", "-q"], cwd=ROOT, env=ENV, check=True)
        subprocess.run(["dvc", "exp", "remove", "bench-zeta"], cwd=ROOT, env=ENV, capture_output=True)
    print(f"post_evaluate alone: {alone:.1f} s; dvc exp run -S zeta=1.5: {exp:.1f} s; "
          f"DVC adds {exp - alone:+.1f} s   target: within 10 s")


if __name__ == "__main__":
    main()
