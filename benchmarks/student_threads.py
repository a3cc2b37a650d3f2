"""The default post-evaluation's students: one after another with every thread (what post_evaluate
does), against two processes side by side with one thread each. Prints both wall times, their ratio,
and each seed's test accuracy under both (a run's bytes depend on its thread count).

    python benchmarks/student_threads.py

Needs the outputs of `dvc repro` (prepared data, condensed shards). Each student and seed is trained
exactly as post_evaluate trains it (``edc.evaluate.train_student``, the same derived seeds), in a
fresh process. Takes about twice the post_evaluate stage (4-5 minutes on 2 cores).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine_line, need  # noqa: E402


def worker(threads: int, jobs: list[str]) -> None:
    """Train ``jobs`` ("student/seed index") with ``threads`` threads; one JSON line per job."""
    import torch

    torch.set_num_threads(threads)
    from edc.data import load_prepared
    from edc.evaluate import Recipe, train_student
    from edc.params import load_params
    from edc.seeding import derive_seed
    from edc.shards import load_condensed

    p = load_params(ROOT / "params.yaml")
    ds = load_condensed(str(need(ROOT / "condensed/shards")), labels=p.evaluate.labels)
    data = load_prepared(str(need(ROOT / "data/prepared")), 0)
    specs = {s.name: s for s in p.evaluate.students}
    val = data.view("val") if data.has_val else None
    for job in jobs:
        name, s = job.split("/")
        t = time.perf_counter()
        r = train_student(specs[name], Recipe(p.evaluate, p.zeta), ds, data.view("test"),
                          derive_seed(p.seed, "evaluate", name, s), val=val)
        print(json.dumps({"job": job, "acc": r.acc, "seconds": time.perf_counter() - t}), flush=True)


def run(procs: list[tuple[int, list[str]]]) -> tuple[float, dict[str, float]]:
    """Start every (threads, jobs) process at once; wall time until the last ends, and accuracies."""
    start = time.perf_counter()
    running = [subprocess.Popen([sys.executable, __file__, "--worker", str(n), *jobs], stdout=subprocess.PIPE,
                                text=True) for n, jobs in procs]
    accs = {}
    for proc in running:
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"a worker failed (exit {proc.returncode})")
        accs.update({d["job"]: d["acc"] for d in map(json.loads, out.splitlines())})
    return time.perf_counter() - start, accs


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        return worker(int(sys.argv[2]), sys.argv[3:])
    print(machine_line(), flush=True)
    from edc.params import load_params

    p = load_params(ROOT / "params.yaml")
    jobs = [f"{s.name}/{i}" for s in p.evaluate.students for i in range(p.evaluate.seeds)]
    import torch

    seq, a = run([(torch.get_num_threads(), jobs)])
    # two one-thread processes, each with a mix of the students (their step costs differ)
    par, b = run([(1, jobs[0::2]), (1, jobs[1::2])])
    print(f"{len(jobs)} students x seeds, {p.evaluate.seeds} seeds each")
    print(f"  one after another, {torch.get_num_threads()} threads   {seq:7.1f} s")
    print(f"  two processes side by side, 1 thread each {par:7.1f} s   {seq / par:.2f}x faster")
    print("  test accuracy per student/seed (threads change the bytes):")
    for job in jobs:
        print(f"    {job:<14} {100 * a[job]:6.2f} %  -> {100 * b[job]:6.2f} %")


if __name__ == "__main__":
    main()
