"""The ``edc`` command: inspect params, registries and artifacts.

    edc check [--params params.yaml]   validate params.yaml (same checks as every stage)
    edc list                           datasets and architectures (with their keyword arguments)
    edc stats FILE                     summarise a statistics file written by collect_stats
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from edc.errors import EdcError


def _check(args: argparse.Namespace) -> None:
    from edc.params import load_params

    p = load_params(args.params)
    print(f"{args.params}: OK ({p.dataset.name}, {len(p.observers.models)} observers, ipc {p.ipc}, "
          f"alpha {p.alpha}, zeta {p.zeta})")


def _list(args: argparse.Namespace) -> None:
    from edc.data import list_sources
    from edc.models import list_models, model_kwargs

    print("datasets:      " + ", ".join(list_sources()))
    print("architectures:")
    for arch in list_models():
        kw = ", ".join(f"{k}={v!r}" for k, v in model_kwargs(arch).items())
        print(f"  {arch:<14} {kw}")


def _stats(args: argparse.Namespace) -> None:
    from edc.stats import load_stats

    stats, meta = load_stats(args.file)
    print(f"{args.file}: observer {meta.get('observer')} ({meta.get('arch')}), {meta.get('num_classes')} classes, "
          f"{meta.get('images')} images, {len(stats)} BatchNorm layers")
    for layer, s in stats.items():
        print(f"  {layer:<40} C={len(s.mean):<5} mean {float(s.mean.mean()):+.4f} var {float(s.var.mean()):.4f}")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="edc", description="EDC dataset condensation toolkit")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="validate params.yaml")
    c.add_argument("--params", default="params.yaml")
    c.set_defaults(fn=_check)
    sub.add_parser("list", help="list datasets and architectures").set_defaults(fn=_list)
    s = sub.add_parser("stats", help="summarise a statistics file")
    s.add_argument("file")
    s.set_defaults(fn=_stats)
    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except EdcError as exc:
        print(str(exc), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
