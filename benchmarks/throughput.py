"""Experiments per hour: the same small set of queued DVC experiments run one at a time and side by
side (`edc queue start --watch -j 1` against `-j 2`, the cores divided between the workers), and the limit
the machine sets: two one-thread copies of one training loop against one two-thread copy.

    python benchmarks/throughput.py            # about 10 minutes on 2 cores (an estimate; see docs/performance.md)
    python benchmarks/throughput.py --quick    # tiny settings: checks that it runs (4-7 minutes), no figures to keep

It builds a scratch git + DVC repository holding this project's pipeline on the bench params (the
repository's params.yaml at ipc 1 with a short budget, below), runs every stage once there
(untimed), then queues ``--experiments`` points of ``alpha`` (each reruns synthesize, relabel and
post_evaluate) and times the queue until it drains, once per ``-j``. DVC's run cache is emptied
between the rounds so that the second computes as much as the first. Each experiment's own span
(its first stage run's start to its last stage run's end, from MLflow) gives the spread.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine_line  # noqa: E402

from edc.params import read_yaml  # noqa: E402

BIN = Path(sys.executable).parent


def bench_params(quick: bool) -> dict:
    """The repository's params at ipc 1 with a budget that makes one experiment (synthesize,
    relabel, post_evaluate) take about a minute on one core; ``quick``: seconds."""
    p = copy.deepcopy(read_yaml(ROOT / "params.yaml"))
    p["ipc"] = 1
    p["observers"]["epochs"] = 1
    p["synth"]["iterations"] = 60
    p["relabel"].update(epochs=150, min_steps=150)
    p["evaluate"].update(seeds=1, eval_every=100)
    if quick:
        tiny = {"name": "tiny", "arch": "convnet", "kwargs": {"width": 8, "depth": 2, "norm": "batch"}}
        p["observers"]["models"] = [tiny]
        p["init"].update(method="real", observers=["tiny"])
        p["synth"].update(observers=["tiny"], iterations=4)
        p["relabel"].update(teachers=["tiny"], epochs=4, min_steps=0)
        p["evaluate"].update(students=[{"name": "student", "arch": "convnet", "kwargs": {"width": 8, "depth": 2}}],
                             eval_every=1)
    return p


def sh(cmd: list[str], cwd: Path, env: dict) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    return r.stdout


def make_repo(work: Path, params: dict) -> tuple[Path, dict]:
    from ruamel.yaml import YAML

    repo = work / "repo"
    repo.mkdir()
    for item in ("edc", "stages"):
        shutil.copytree(ROOT / item, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
    for item in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / item, repo / item)
    with open(repo / "params.yaml", "w") as f:
        YAML(typ="safe").dump(params, f)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "EDC_JOBS", "EDC_THREADS",
                        "OMP_NUM_THREADS")}
    env.update(HOME=str(work), PATH=f"{BIN}:{env['PATH']}", DVC_NO_ANALYTICS="1", PYTHONPATH=str(repo),
               GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.com", GIT_COMMITTER_NAME="bench",
               GIT_COMMITTER_EMAIL="bench@example.com")
    for cmd in (["git", "init", "-q", "-b", "main"], ["dvc", "init", "-q"], ["dvc", "repro", "-q"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        sh(cmd, repo, env)
    return repo, env


def workers(repo: Path, env: dict) -> str:
    out = sh(["dvc", "queue", "status"], repo, env)
    return next((line for line in out.splitlines() if line.startswith("Worker status")), "")


def drain(repo: Path, env: dict, names: list[str], jobs: int) -> tuple[float, int]:
    """Queue ``names`` (alpha points), start ``jobs`` workers with `edc queue start --watch`, which
    returns when nothing is queued or running and starts again a worker that dies meanwhile (else a
    dead worker would make the round measure kombu's race, not the machine); then stop the workers.
    The wall time from start to the queue's end, and how many workers were started again."""
    shutil.rmtree(repo / ".dvc" / "cache" / "runs", ignore_errors=True)  # no stage restored from a past run
    for name in names:
        sh(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"alpha={name.rsplit('-', 1)[1]}"], repo, env)
    log = repo.parent / f"watch-j{jobs}.log"
    start = time.perf_counter()
    # A file, not a pipe: a worker the watch starts again inherits its stdout and outlives it.
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "edc.cli", "queue", "start", "-j", str(jobs), "--watch"],
                           cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"edc queue start --watch failed:\n{log.read_text()}")
    status = sh(["dvc", "queue", "status"], repo, env)
    if status.count("Success") < len(names) or "Failed" in status:
        raise SystemExit(f"not every experiment succeeded:\n{status}\n(see `dvc queue logs NAME` in {repo})")
    sh(["dvc", "queue", "stop"], repo, env)
    deadline = time.monotonic() + 60
    while not workers(repo, env).startswith("Worker status: 0 active, 0 idle") and time.monotonic() < deadline:
        time.sleep(2)
    return seconds, log.read_text().count("; started again")


def spans(repo: Path, names: list[str]) -> tuple[list[tuple[float, float]], set[str]]:
    """Each experiment's span, (start, end) in seconds: its first stage run's start to its last stage
    run's end; and the torch thread counts its stages ran with (MLflow tag ``edc.threads``)."""
    db = sqlite3.connect(repo / "mlflow.db")
    out, threads = [], set()
    for name in names:
        runs = "select run_uuid from tags where key = 'dvc.exp_name' and value = ?"
        (lo, hi), = db.execute(f"select min(start_time), max(end_time) from runs where run_uuid in ({runs})",
                               (name,))
        out.append((lo / 1000, hi / 1000))
        threads |= {v for (v,) in db.execute(f"select value from tags where key = 'edc.threads' and run_uuid in "
                                             f"({runs})", (name,))}
    return out, threads


def covered(intervals: list[tuple[float, float]]) -> float:
    """Seconds during which at least one of ``intervals`` is open."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def side_by_side(intervals: list[tuple[float, float]]) -> float:
    """Seconds during which at least two of ``intervals`` are open: with ``-j 2``, the share of the
    wall the workers really ran together (a worker stopped early runs the rest one at a time)."""
    events = sorted([(lo, 1) for lo, _ in intervals] + [(hi, -1) for _, hi in intervals])
    total, open_, since = 0.0, 0, 0.0
    for t, step in events:
        if open_ >= 2:
            total += t - since
        open_, since = open_ + step, t
    return total


def loop_worker(threads: int, repo: str) -> None:
    """One copy of the training loop: the first student, seed 0, as post_evaluate trains it."""
    from edc.runtime import configure_threads

    configure_threads(threads)
    from edc.data import load_prepared
    from edc.evaluate import Recipe, train_student
    from edc.params import load_params
    from edc.seeding import derive_seed
    from edc.shards import load_condensed

    p = load_params(Path(repo) / "params.yaml")
    ds = load_condensed(str(Path(repo) / "condensed/shards"), labels=p.evaluate.labels)
    data = load_prepared(str(Path(repo) / "data/prepared"), 0)
    spec = p.evaluate.students[0]
    t = time.perf_counter()
    r = train_student(spec, Recipe(p.evaluate, p.zeta), ds, data.view("test"),
                      derive_seed(p.seed, "evaluate", spec.name, "0"))
    print(json.dumps({"seconds": time.perf_counter() - t, "acc": r.acc}), flush=True)


def copies(repo: Path, env: dict, threads: int, n: int) -> float:
    """Wall time of ``n`` copies of the loop side by side, ``threads`` each (start-up excluded: each
    copy reports its own loop time; the wall is the slowest copy's)."""
    procs = [subprocess.Popen([sys.executable, __file__, "--loop", str(threads), str(repo)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(n)]
    times = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"a training-loop copy failed (exit {proc.returncode})")
        times.append(json.loads(out.splitlines()[-1])["seconds"])
    return max(times)


def limit(repo: Path, env: dict, rounds: int) -> list[float]:
    """Per round: throughput of two one-thread copies over one two-thread copy (2 * t2 / t11)."""
    out = []
    for _ in range(rounds):
        t2 = copies(repo, env, 2, 1)
        t11 = copies(repo, env, 1, 2)
        out.append(2 * t2 / t11)
    return out


def main() -> None:
    if sys.argv[1:2] == ["--loop"]:
        return loop_worker(int(sys.argv[2]), sys.argv[3])
    print(machine_line(), flush=True)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings: checks the benchmark runs; no figures")
    ap.add_argument("--experiments", type=int, default=4, help="alpha points queued per round (default 4)")
    ap.add_argument("--jobs", type=int, default=2, help="workers side by side (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the limit measurement (default 3)")
    ap.add_argument("--keep", help="build the scratch repository in this new directory and keep it")
    args = ap.parse_args()
    n = 2 if args.quick and args.experiments == 4 else args.experiments
    alphas = [round(0.1 + 0.8 * i / max(1, n - 1), 3) for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep).resolve() if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        repo, env = make_repo(work, bench_params(args.quick))
        print(f"scratch repository and its first dvc repro: {time.perf_counter() - t:.0f} s (untimed setup)",
              flush=True)
        results = {}
        for jobs in (1, args.jobs):
            names = [f"j{jobs}-{a}" for a in alphas]
            wall, restarted = drain(repo, env, names, jobs)
            intervals, threads = spans(repo, names)
            each = [hi - lo for lo, hi in intervals]
            results[jobs] = wall
            print(f"  -j {jobs}: {n} experiments in {wall:6.1f} s = {3600 * n / wall:6.1f} experiments/hour; "
                  f"each {statistics.median(each):.1f} s (min {min(each):.1f}, max {max(each):.1f}); stages ran "
                  f"with {'/'.join(sorted(threads))} torch thread(s); no stage running for "
                  f"{wall - covered(intervals):.1f} s of the wall (DVC's queue: workers, workspace copies, "
                  f"commits); two or more experiments running for {side_by_side(intervals):.1f} s; "
                  f"{restarted} worker(s) died and were started again", flush=True)
        gain = results[1] / results[args.jobs]
        print(f"side by side (-j {args.jobs}) over one at a time: {gain:.2f}x experiments per hour   goal >= 1.4x")
        lim = limit(repo, env, 1 if args.quick else args.rounds)
        med = statistics.median(lim)
        print(f"limit, two one-thread copies of the training loop over one two-thread copy: {med:.2f}x "
              f"(min {min(lim):.2f}, max {max(lim):.2f}; {len(lim)} rounds); side by side reaches "
              f"{100 * gain / med:.0f} % of it (goal: >= 90 % where the limit is below 1.4x)")
        if args.quick:
            print("(--quick: tiny settings, the figures mean nothing)")


if __name__ == "__main__":
    main()
