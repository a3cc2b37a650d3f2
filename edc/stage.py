"""What every stage script shares: argv parsing basics and turning user errors into one-line exits."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edc.errors import EdcError

if TYPE_CHECKING:  # annotations only: a stage imports the params model when it reads them
    from edc.params import Params

# The params each stage reads, declared once: dvc.yaml's `params:` must list exactly these
# (tests/test_dvc_deps.py), and each stage logs them to MLflow and fingerprints its resume
# checkpoints with them through :func:`stage_params`.
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "prepare": ("seed", "dataset"),
    "train_observers": ("device", "bf16", "seed", "observers"),
    "collect_stats": ("device", "seed", "stats", "synth.aug"),
    "init": ("device", "seed", "trial", "ipc", "init"),
    "synthesize": ("device", "seed", "trial", "alpha", "synth"),
    "relabel": ("device", "bf16", "seed", "trial", "relabel"),
    "post_evaluate": ("device", "bf16", "seed", "trial", "zeta", "evaluate", "relabel.batch_size", "relabel.epochs",
                      "relabel.min_steps"),
    # The evaluation recipe without the keys only soft labels read (loss, temperature) and without
    # labels, variants: one reference serves every method, ipc and trial evaluated under the recipe.
    "reference": ("device", "bf16", "seed", "zeta", "evaluate.students", "evaluate.seeds", "evaluate.lr",
                  "evaluate.weight_decay", "evaluate.schedule", "evaluate.milestones", "evaluate.gamma",
                  "evaluate.ema", "evaluate.ema_rate", "evaluate.ema_warmup", "evaluate.eval_every",
                  "relabel.batch_size", "relabel.aug", "reference"),
    "continual": ("device", "bf16", "seed", "zeta", "evaluate", "continual"),
    "slimming": ("device", "seed", "evaluate.temperature", "slimming"),
}


def stage_params(p: Params, stage: str) -> dict:
    """The values of :data:`STAGE_PARAMS` ``[stage]`` in params ``p``, nested as in params.yaml
    (``relabel.epochs`` -> ``{"relabel": {"epochs": ...}}``)."""
    from edc.params import get_dotted, set_dotted

    full = p.model_dump()
    out: dict = {}
    for key in STAGE_PARAMS[stage]:
        value = get_dotted(full, key, default=KeyError)
        if value is KeyError:  # a STAGE_PARAMS key the params model does not have: a bug here
            raise KeyError(key)
        set_dotted(out, key, value)
    return out


def parser(stage: str, doc: str | None, paths: dict[str, str] | None = None,
           optional: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The stage's command line: ``--params``, one required ``--NAME`` per entry of ``paths`` (name:
    help) and an optional one per entry of ``optional``."""
    ap = argparse.ArgumentParser(prog=f"stages/{stage}.py", description=(doc or "").strip().splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    for name, text in (paths or {}).items():
        ap.add_argument(f"--{name}", required=True, help=text)
    for name, text in (optional or {}).items():
        ap.add_argument(f"--{name}", help=text)
    return ap


def _params_differ_from_head() -> bool:
    r = subprocess.run(["git", "show", "HEAD:./params.yaml"], capture_output=True)
    here = Path("params.yaml")
    return r.returncode == 0 and here.exists() and here.read_bytes() != r.stdout


def restore_hint() -> str | None:
    """Under DVC (which sets ``DVC_STAGE``), the line that says how to get back the outputs DVC deleted
    before running the stage; None when the script runs alone (its outputs are then untouched)."""
    stage = os.environ.get("DVC_STAGE")
    if not stage:
        return None
    root = os.environ.get("DVC_ROOT")
    if root and Path(root, ".dvc", "tmp") in Path.cwd().resolve().parents:
        return ("this experiment ran in a temporary copy of the workspace (--queue, --temp): the workspace itself "
                "is as it was")
    where = "metrics and plots from git HEAD"
    if os.environ.get("DVC_EXP_NAME"):
        where += "; and params.yaml and dvc.lock as committed: `dvc exp run -S` left its values there"
    elif _params_differ_from_head():
        where += "; and params.yaml as committed, which differs: add --keep-params to keep your edits"
    return (f"dvc deleted the outputs of stage {stage} before running it; `edc restore {stage}` puts back the "
            f"version dvc.lock records (cached outputs by dvc checkout, {where})")


def process_start() -> float | None:
    """When this process started (Unix time, from /proc; None elsewhere): its start-up and imports
    end where :func:`stage_main` begins."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def record_timing(path: str, entered: float) -> None:
    """Append one JSON line to ``path`` (``EDC_TIMING_FILE``; benchmarks/overhead.py): this stage
    process's start, the start of :func:`stage_main`, its end, and the seconds spent in compute loops
    (:data:`edc.progress.clock`) and waiting for MLflow (:data:`edc.tracking.stage_clock`). Never an
    output of the stage: timings would change its bytes at every run."""
    import json

    from edc.progress import clock
    from edc.tracking import stage_clock

    line = {"stage": os.environ.get("DVC_STAGE") or os.path.basename(sys.argv[0]), "pid": os.getpid(),
            "process_start": process_start(), "main_start": entered, "end": time.time(), **clock, **stage_clock}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def stage_main(fn: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None, *,
               threads: bool = True) -> None:
    """Run a stage's ``main`` with torch's thread count set (:func:`edc.runtime.configure_threads`); a
    user error prints its lines to stderr and exits 2, no traceback. Under DVC, every failure ends with
    :func:`restore_hint`.

    ``threads=False`` is for a stage that may be off (``reference.enabled``, ``continual.enabled``,
    ``slimming.enabled``): its ``main`` calls ``configure_threads`` itself once it knows it computes,
    so that, off, it writes its placeholder outputs without importing torch."""
    entered = time.time()
    try:
        if threads:
            from edc.runtime import configure_threads  # here: importing torch is the stage's business

            configure_threads()  # EDC_THREADS / EDC_JOBS: side-by-side runs divide the cores
        fn(argv)
        if os.environ.get("EDC_TIMING_FILE"):
            record_timing(os.environ["EDC_TIMING_FILE"], entered)
    except EdcError as exc:
        for line in str(exc).splitlines():
            print(line, file=sys.stderr)
        hint = restore_hint()  # only a failure needs it (it asks git for params.yaml)
        if hint:
            print(hint, file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: no output of this stage was replaced; rerun `dvc repro` to finish (synthesize, relabel "
              "and post_evaluate resume from their last checkpoint)", file=sys.stderr)
        hint = restore_hint()
        if hint:
            print(hint, file=sys.stderr)
        sys.exit(130)
    except Exception:
        hint = restore_hint()
        if not hint:
            raise
        traceback.print_exc()
        print(hint, file=sys.stderr)
        sys.exit(1)
