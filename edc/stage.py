"""What every stage script shares: argv parsing basics and turning user errors into one-line exits."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from edc.errors import EdcError


def parser(stage: str, doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"stages/{stage}.py", description=(doc or "").strip().splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return ap


def stage_main(fn: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> None:
    """Run a stage's ``main``; a user error prints its lines to stderr and exits 2, no traceback."""
    try:
        fn(argv)
    except EdcError as exc:
        for line in str(exc).splitlines():
            print(line, file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: no output of this stage was replaced; rerun `dvc repro` to finish (synthesize, relabel "
              "and post_evaluate resume from their last checkpoint)", file=sys.stderr)
        sys.exit(130)
