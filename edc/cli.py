"""The ``edc`` command: inspect params, registries and artifacts.

    edc check [--params params.yaml]   validate params.yaml (same checks as every stage)
    edc list                           datasets and architectures (with their keyword arguments)
    edc stats FILE                     summarise a statistics file written by collect_stats
    edc exp preset NAME [--ipc N]      run one of the paper's methods as a DVC experiment (--trials N: N of them)
    edc exp sweep NAME [--ipc N]       run a design-space sweep around the edc preset (--queue to queue it)
    edc report                         tables and plots of the experiments into reports/
    edc results                        docs/results.md and README.md's headline from the trials (same bytes on a rerun)
    edc metrics [FILE]                 the students' test and validation accuracy (reports/metrics.json)
    edc export SET OUT                 a condensed set as an image folder (+ soft labels, card)
    edc evaluate SET... --archs A...   students of any architecture on any sets, soft and hard labels
    edc smoke [--keep DIR]             the whole pipeline on tiny settings in a scratch copy (1-2 minutes)
    edc restore [STAGE...]             after a failed stage: the outputs dvc.lock records, params.yaml as committed
    edc queue start -j N               `dvc queue start -j N` with the cores divided between the N workers
    edc queue start -j N --watch       ... and stay until the queue is done, starting again a worker that dies

A mistake on the command line ends in one line naming the option and what is wrong, exit status 2,
before anything is written or launched: argparse's own errors (:class:`OneLineParser`), the type
functions below (reusable for new options), and the checks each command makes of its arguments
against params.yaml and the files they name (``_check_*``).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edc.errors import EdcError

if TYPE_CHECKING:  # annotations only: each subcommand imports what it needs, so `edc --help` stays quick
    from edc.params import Params


class OneLineParser(argparse.ArgumentParser):
    """argparse, whose errors are one line (``edc exp preset: argument --ipc: ...``) instead of the usage
    lines and then the error; exit status 2 as before."""

    def error(self, message: str):
        print(f"{self.prog}: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2)


# Argument types: argparse turns their ArgumentTypeError into "argument --OPTION: <message>".

def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer (got {text!r})") from None


def positive_int(text: str) -> int:
    """A count: an integer >= 1."""
    n = _int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (got {text!r})")
    return n


def existing_path(text: str) -> str:
    """A file or directory that exists."""
    if not Path(text).expanduser().exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or directory")
    return text


def existing_file(text: str) -> str:
    """A file that exists."""
    if not Path(existing_path(text)).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"{text}: not a file")
    return text


def existing_dir(text: str) -> str:
    """A directory that exists."""
    if not Path(existing_path(text)).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a directory")
    return text


def new_dir(text: str) -> str:
    """A directory to create: absent, or empty."""
    p = Path(text).expanduser()
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise argparse.ArgumentTypeError(f"{text}: exists and is not an empty directory; name a new one")
    return text


def _hex_prefix(text: str) -> str:
    """A commit as a hash or its first characters (at least 4): what `dvc exp show` gives a baseline."""
    if not re.fullmatch(r"[0-9a-f]{4,40}", text):
        raise argparse.ArgumentTypeError(f"must be a commit hash, 4 to 40 hex digits (got {text!r})")
    return text


def new_file(text: str) -> str:
    """A file to write: not a directory."""
    if Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a directory; name a file")
    return text


def set_source(text: str) -> str:
    """A condensed set or image folder: an http(s) URL, a ``pipe:`` command, or a local directory that
    holds a set's meta.json or class folders."""
    from edc.shards import is_url

    if is_url(text):
        return text
    p = Path(existing_dir(text)).expanduser()
    if not (p / "meta.json").is_file() and not any(d.is_dir() for d in p.iterdir()):
        raise argparse.ArgumentTypeError(f"{text}: neither a condensed set (no meta.json) nor an image folder "
                                         "(no <class>/<image> folders)")
    return text


def condensed_set(text: str) -> str:
    """A condensed set: an http(s) URL, a ``pipe:`` command, or a local directory with a set's meta.json."""
    from edc.shards import is_url

    if not is_url(text) and not (Path(existing_dir(text)).expanduser() / "meta.json").is_file():
        raise argparse.ArgumentTypeError(f"{text}: not a condensed set (no meta.json; the relabel stage writes "
                                         "one to condensed/shards)")
    return text


def key_value(text: str) -> str:
    """``KEY=VALUE``, as ``dvc exp run -S`` takes it."""
    key = text.split("=", 1)[0]
    if "=" not in text or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (got {text!r})")
    return text


def _yaml_value(text: str):
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        return YAML(typ="safe").load(text)
    except YAMLError:
        raise argparse.ArgumentTypeError(f"not a YAML value (got {text!r})") from None


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


def _dvc_exp_run(name: str, overrides: dict, args: argparse.Namespace) -> list[str]:
    from edc.presets import format_value
    from edc.report import dvc_command

    cmd = [dvc_command(), "exp", "run", "-n", name]
    mine = {extra.split("=", 1)[0] for extra in args.set or []}  # the user's -S wins over the preset's
    for key, value in overrides.items():
        if key not in mine:
            cmd += ["-S", f"{key}={format_value(value)}"]
    for extra in args.set or []:
        cmd += ["-S", extra]
    if args.queue:
        cmd.append("--queue")
    return cmd


def _check_experiment(cmd: list[str], params: str) -> None:
    """Validate the params a ``dvc exp run`` command would run with: ``params`` with its ``-S`` values
    applied as DVC applies them, in a scratch copy, so that a bad value fails here in one line instead
    of a stage failing minutes into the experiment."""
    import shutil
    import tempfile

    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    from edc.errors import ParamsError
    from edc.params import load_params

    load_params(params)  # the file itself first: its own one-line errors
    sets = [cmd[i + 1] for i, c in enumerate(cmd) if c == "-S"]
    with tempfile.TemporaryDirectory(prefix="edc-exp-params-") as tmp:
        copy = Path(tmp) / "params.yaml"
        shutil.copyfile(params, copy)
        try:
            apply_overrides(copy, sets)
        except InvalidArgumentError as exc:
            cause = " ".join(str(exc.__cause__ or exc).split())
            raise EdcError(f"-S/--set: {cause}") from None
        try:
            load_params(copy)
        except ParamsError as exc:
            raise ParamsError(f"{params} with the experiment's -S values", exc.problems) from None


def _existing_experiments() -> set[str]:
    from edc.report import dvc_command

    r = subprocess.run([dvc_command(), "exp", "list", "--name-only"], capture_output=True, text=True)
    return set(r.stdout.split()) if r.returncode == 0 else set()


def _launch(commands: list[tuple[str, list[str]]], args: argparse.Namespace) -> None:
    for _, cmd in commands:
        _check_experiment(cmd, args.params)
    existing = _existing_experiments() if not args.dry_run else set()
    clash = [name for name, _ in commands if name in existing]
    if clash and not args.replace:
        raise EdcError(f"experiment(s) {', '.join(clash)} exist for this commit; pass --replace to run them again "
                       "(the old ones are removed) or remove them with `dvc exp remove`")
    for name, cmd in commands:
        print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        if args.dry_run:
            continue
        if name in clash:
            subprocess.run([cmd[0], "exp", "remove", name], check=False)
        r = subprocess.run(cmd)
        if r.returncode != 0:
            raise EdcError(f"experiment {name} failed (exit status {r.returncode}); see the output above")
    if args.queue and not args.dry_run:
        print("queued; run them with `edc queue start -j N` (N side by side, the cores divided between them) and "
              "follow with `dvc queue status`")


def _trial_points(name: str, overrides: dict, args: argparse.Namespace) -> list[tuple[str, dict]]:
    """One experiment, or with ``--trials N`` N of them: ``NAME-t0`` ... with ``trial`` 0 ... N-1."""
    if args.trials is None:
        return [(name, overrides)]
    if any(extra.split("=", 1)[0] == "trial" for extra in args.set or []):
        raise EdcError("--trials sets the param trial of each experiment; remove -S trial=...")
    return [(f"{name}-t{k}", {**overrides, "trial": k}) for k in range(args.trials)]


def _preset(args: argparse.Namespace) -> None:
    from edc.params import load_params
    from edc.presets import experiment_name, preset_overrides

    p = load_params(args.params)
    ipc = p.ipc if args.ipc is None else args.ipc
    overrides = {"ipc": ipc, **preset_overrides(args.name, p)}
    name = args.exp_name or experiment_name(args.name, ipc)
    _launch([(n, _dvc_exp_run(n, o, args)) for n, o in _trial_points(name, overrides, args)], args)


def _sweep(args: argparse.Namespace) -> None:
    from edc.params import load_params
    from edc.presets import SWEEPS, experiment_name, preset_overrides

    p = load_params(args.params)
    if args.name not in SWEEPS:
        raise EdcError(f"unknown sweep {args.name!r} (known: {', '.join(SWEEPS)})")
    sweep, ipc = SWEEPS[args.name], (p.ipc if args.ipc is None else args.ipc)
    base = {"ipc": ipc, **preset_overrides("edc", p)}
    commands = []
    for value in (args.values or sweep.values):
        if args.name == "ipc":
            name, point = experiment_name("edc", value), {**base, "ipc": value}
        else:
            name, point = experiment_name(args.name, ipc, value), {**base, sweep.key: value}
            if point == base and not args.values:
                print(f"{name}: the edc preset itself (edc-ipc{ipc}); run `edc exp preset edc` for it")
                continue
        commands += [(n, _dvc_exp_run(n, o, args)) for n, o in _trial_points(name, point, args)]
    _launch(commands, args)


def _dataset(args: argparse.Namespace) -> None:
    from edc.presets import dataset_overrides

    root = str(Path(args.root).expanduser().resolve())
    overrides = dataset_overrides(args.name, root)
    if args.ipc is not None:
        overrides["ipc"] = args.ipc
    if args.apply:
        from dvc.utils.hydra import apply_overrides

        from edc.presets import format_value

        sets = [f"{k}={format_value(v)}" for k, v in overrides.items()] + (args.set or [])
        _check_experiment([c for kv in sets for c in ("-S", kv)], args.params)  # before params.yaml is touched
        apply_overrides(args.params, sets)
        print(f"{args.params}: switched to the paper's {args.name} settings; `dvc params diff` shows the changes, "
              "`dvc repro` runs them")
        return
    name = args.exp_name or f"{args.name}-paper"
    _launch([(n, _dvc_exp_run(n, o, args)) for n, o in _trial_points(name, overrides, args)], args)


def _report(args: argparse.Namespace) -> None:
    from edc.report import build_report, check_mlflow, read_experiments

    exps = read_experiments(".")
    if not args.no_mlflow:
        check_mlflow(exps)
    out = Path(args.out)
    text = build_report(exps, Path(args.plots), out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    differ = [e.name for e in exps.values() if e.mlflow_ok is False]
    print(f"{out}: {len(exps)} experiments" + (f"; MLflow differs for {', '.join(differ)}" if differ else ""))


# The page's figures get their own folder: docs/plots holds the figures docs/findings.md shows, which a
# rerun must not redraw from other experiments.
RESULTS_DEFAULTS = {"out": "docs/results.md", "plots": "docs/plots/results", "readme": "README.md"}


def _results_command(args: argparse.Namespace) -> str:
    """The command line that makes this page again, as the page states it (defaults left out)."""
    parts = ["edc results"]
    for key in ("out", "plots", "readme"):
        value = getattr(args, key)
        if value is not None and value != RESULTS_DEFAULTS[key]:
            parts.append(f"--{key} {shlex.quote(value)}")
    parts += [f"--commit {shlex.quote(rev)}" for rev in args.commit or []]
    return " ".join(parts + ["--no-readme"] * (args.readme is None) + ["--no-mlflow"] * args.no_mlflow)


def _results(args: argparse.Namespace) -> None:
    from edc.io import atomic_file
    from edc.report import check_mlflow, headline, headline_block, read_experiments, results_page, with_headline

    readme = Path(args.readme).read_text() if args.readme else None
    if readme is not None:
        headline_block(readme, args.readme)  # the markers, before anything is written
    exps = read_experiments(".", args.commit)
    if readme is not None and not headline(exps):
        raise EdcError(f"{args.readme}: no preset trials among the experiments for its headline (run e.g. "
                       "`edc exp preset edc --ipc 1 --trials 5` first, or pass --no-readme)")
    if not args.no_mlflow:
        check_mlflow(exps)
    out = Path(args.out)
    text = results_page(exps, Path(args.plots), out.parent, _results_command(args), args.readme)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as f:
        f.write(text)
    if readme is not None:
        with atomic_file(args.readme) as f:
            f.write(with_headline(readme, headline_block(text, str(out)), args.readme))
    print(f"{out}: {len(exps)} experiments" + (f"; headline written into {args.readme}" if readme is not None else ""))


def _export(args: argparse.Namespace) -> None:
    from edc.export import export_imagefolder

    out = export_imagefolder(args.set, args.out)
    print(f"{out}: image folder (one subfolder per class), labels.csv, soft_logits.npy, meta.json")


def _check_archs(archs: list[str], p: Params) -> None:
    """Each of ``--archs`` names a student, a registry architecture or a torchvision model."""
    from edc.crosseval import student_spec

    for arch in archs:
        spec = student_spec(arch, list(p.evaluate.students))
        if spec.arch == "torchvision":
            import torchvision.models as tvm

            known = tvm.list_models(module=tvm)
            if spec.kwargs["name"] not in known:
                raise EdcError(f"--archs: torchvision has no classification model {spec.kwargs['name']!r} "
                               f"(e.g. {', '.join(known[:4])}, ...)")


def _check_teachers(teachers: list[str] | None, observers: str) -> None:
    """Each of ``--teachers`` is an observer trained into ``--observers``."""
    for name in teachers or []:
        if not (Path(observers) / f"{name}.safetensors").is_file():
            found = sorted(f.stem for f in Path(observers).glob("*.safetensors"))
            raise EdcError(f"--teachers: no observer {name!r} in --observers {observers} "
                           f"(it has: {', '.join(found) or 'none'})")


def _check_sets(sets: list[str], labels: list[str], teachers: list[str] | None) -> None:
    """An image folder among the sets has teachers for its soft labels."""
    from edc.crosseval import is_imagefolder

    for src in sets:
        if is_imagefolder(src) and "soft" in labels and not teachers:
            raise EdcError(f"{src}: an image folder has no stored soft labels; name --teachers (observers) to "
                           f"label it, or use --labels hard")


def _check_set_datasets(sets: list[str], facts) -> None:
    """Each local condensed set is readable and made from the test split's dataset (URLs are read, and
    checked, as the students train)."""
    from edc.crosseval import is_imagefolder
    from edc.shards import is_url, load_condensed

    for src in sets:
        if not is_url(src) and not is_imagefolder(src):
            made = load_condensed(src).facts
            if (made.name, made.num_classes) != (facts.name, facts.num_classes):
                raise EdcError(f"{src}: made from {made.name}, but the test split (--data) is {facts.name}")


def _evaluate(args: argparse.Namespace) -> None:
    import json

    from edc.crosseval import cross_evaluate, results_json, table
    from edc.data import load_prepared
    from edc.observers import load_observer
    from edc.params import load_params
    from edc.runtime import place, resolve_device
    from edc.tracking import stage_run

    p = load_params(args.params)
    _check_archs(args.archs, p)
    _check_teachers(args.teachers, args.observers)
    _check_sets(args.sets, args.labels, args.teachers)
    if args.seeds is not None:
        p = p.model_copy(update={"evaluate": p.evaluate.model_copy(update={"seeds": args.seeds})})
    device = resolve_device(p.device)
    data = load_prepared(args.data, p.workers)
    _check_set_datasets(args.sets, data.facts)
    teachers = [place(load_observer(args.observers, t)[0], device) for t in args.teachers] if args.teachers else None
    params = {"sets": args.sets, "archs": args.archs, "labels": args.labels, "teachers": args.teachers or [],
              "seed": p.seed, "zeta": p.zeta, "evaluate": p.evaluate.model_dump(), "relabel": p.relabel.model_dump()}
    with stage_run("evaluate", params, seed=p.seed) as run:
        res = cross_evaluate(args.sets, args.archs, args.labels, p, data, teachers=teachers, device=device, run=run)
        text = table(res, args.archs, args.labels)
        for src, row in results_json(res).items():
            for arch, kinds in row.items():
                run.metrics({f"{Path(src).name}.{arch}.{k}.acc_mean": v["acc_mean"] for k, v in kinds.items()})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(results_json(res), indent=1) + "\n")
    print(text, end="")
    print(f"-> {args.out} and {Path(args.out).with_suffix('.json')}")


def _metrics(args: argparse.Namespace) -> None:
    from edc.summary import accuracy_table, read_metrics

    print(accuracy_table(read_metrics(args.file)), end="")


def _smoke(args: argparse.Namespace) -> None:
    from edc.smoke import run_smoke

    run_smoke(Path(args.project).resolve(), Path(args.keep).resolve() if args.keep else None)


def _restore(args: argparse.Namespace) -> None:
    from edc.restore import restore

    restore(args.stages, keep_params=args.keep_params)


def _fail_killed_tasks() -> None:
    """Mark failed the queued experiments that were killed with their worker (edc.dvcqueue), which
    `dvc queue status` would otherwise list as running for good."""
    from edc.dvcqueue import killed_tasks
    from edc.report import dvc_command
    from edc.tracking import project_root

    for task in killed_tasks(project_root()):
        print(f"{task[:7]}: listed as running, but its process is gone (killed); marking it failed: "
              f"$ dvc queue kill {task[:7]}", flush=True)
        subprocess.run([dvc_command(), "queue", "kill", task])


def _drop_stale_control_messages(quiet: bool = False) -> None:
    """Delete the control messages left for queue workers that are gone (edc.dvcqueue): a `dvc queue
    stop` among them would make the new worker of that number exit after its first experiment.
    ``quiet``: say nothing (the watch drops those a running worker's broadcasts leave at every poll)."""
    from edc.dvcqueue import stale_control_messages
    from edc.tracking import project_root

    stale = stale_control_messages(project_root())
    for msg in stale:
        msg.unlink(missing_ok=True)
    if stale and not quiet:
        print(f"dropped {len(stale)} control message(s) (`dvc queue stop`, `dvc queue status`) left for workers "
              "that are gone", flush=True)


def _queue_start(args: argparse.Namespace) -> None:
    import os

    from edc.report import dvc_command
    from edc.runtime import JOBS_ENV

    _fail_killed_tasks()
    _drop_stale_control_messages()
    # DVC's queue workers are processes started by this command, inheriting its environment; each
    # stage they run gives torch (cores // EDC_JOBS) threads (edc.runtime.resolve_threads).
    env = {**os.environ, JOBS_ENV: str(args.jobs)}
    cmd = [dvc_command(), "queue", "start", "-j", str(args.jobs)]
    print(f"$ {JOBS_ENV}={args.jobs} " + " ".join(cmd), flush=True)
    if args.watch:
        from edc.dvcqueue import log_size
        from edc.tracking import project_root

        since = {num: log_size(project_root(), num) for num in range(1, args.jobs + 1)}
    r = subprocess.run(cmd, env=env)
    if r.returncode != 0:
        raise EdcError(f"dvc queue start failed (exit status {r.returncode}); see the output above")
    print("workers already running keep the thread count they started with; `dvc queue stop` ends them")
    if args.watch:
        _watch_queue(args.jobs, env, since)


def _watch_queue(jobs: int, env: dict[str, str], since: dict[int, int]) -> None:
    """Stay until the queue has nothing queued or running, starting again a worker that died while
    experiments wait (edc.dvcqueue.Watch); Ctrl-C leaves the workers running."""
    import os

    from edc.dvcqueue import Watch
    from edc.tracking import project_root

    root = Path(project_root())

    def spawn(num: int) -> None:
        from dvc.repo import Repo

        # DVC's own start of one worker number, as `dvc queue start` makes it for each missing one; the
        # new process inherits this one's environment, so it keeps the thread split.
        os.environ.update(env)
        with Repo(str(root)) as repo:
            repo.experiments.celery_queue._spawn_worker(num)

    def tidy() -> None:
        _fail_killed_tasks()
        _drop_stale_control_messages(quiet=True)

    print("watching the queue until nothing is queued or running (Ctrl-C stops watching)", flush=True)
    try:
        replaced = Watch(root, jobs, spawn, tidy, echo=lambda line: print(line, flush=True), since=since).run()
    except KeyboardInterrupt:
        print(f"\nstopped watching; the workers keep running (`edc queue start -j {jobs} --watch` watches them "
              "again, `dvc queue stop` ends them)", flush=True)
        return
    print(f"the queue is empty: nothing queued or running ({replaced} worker(s) started again)", flush=True)


def _exp_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--ipc", type=positive_int, help="images per class (default: params.yaml's ipc)")
    sp.add_argument("--trials", type=positive_int, metavar="N",
                    help="N trials of each experiment, NAME-t0 ... (params trial 0 ... N-1): the initial draw, "
                         "synthesis, relabel plan and student seeds redrawn, the split, observers and statistics "
                         "shared (change seed for those)")
    sp.add_argument("--queue", action="store_true", help="queue instead of running (then `edc queue start -j N`)")
    sp.add_argument("--replace", action="store_true", help="rerun experiments whose name exists already")
    sp.add_argument("--dry-run", action="store_true", help="print the dvc commands only")
    sp.add_argument("-S", "--set", action="append", type=key_value, metavar="KEY=VALUE",
                    help="further params, as for dvc exp run")
    sp.add_argument("--params", default="params.yaml", type=existing_file)


def main(argv: Sequence[str] | None = None) -> None:
    ap = OneLineParser(prog="edc", description="EDC dataset condensation toolkit")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND", required=True)
    c = sub.add_parser("check", help="validate params.yaml")
    c.add_argument("--params", default="params.yaml", type=existing_file)
    c.set_defaults(fn=_check)
    sub.add_parser("list", help="list datasets and architectures").set_defaults(fn=_list)
    s = sub.add_parser("stats", help="summarise a statistics file")
    s.add_argument("file", metavar="FILE", type=existing_file)
    s.set_defaults(fn=_stats)
    e = sub.add_parser("exp", help="run the paper's methods and sweeps as DVC experiments")
    esub = e.add_subparsers(dest="exp_cmd", metavar="COMMAND", required=True)
    from edc.presets import PRESET_HELP, SWEEPS

    pr = esub.add_parser("preset", help="run one method: " + ", ".join(PRESET_HELP),
                         description="\n".join(f"{k}: {v}" for k, v in PRESET_HELP.items()),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("name", metavar="PRESET", choices=list(PRESET_HELP))
    pr.add_argument("-n", "--name", dest="exp_name", help="experiment name (default: NAME-ipcN)")
    _exp_args(pr)
    pr.set_defaults(fn=_preset)
    sw = esub.add_parser("sweep", help="one design choice around the edc preset: " + ", ".join(SWEEPS),
                         description="\n".join(f"{k}: {s.key} in {list(s.values)} ({s.help})"
                                               for k, s in SWEEPS.items()),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    sw.add_argument("name", metavar="SWEEP", choices=list(SWEEPS))
    sw.add_argument("--values", nargs="+", type=_yaml_value, help="only these values")
    _exp_args(sw)
    sw.set_defaults(fn=_sweep)
    from edc.presets import DATASET_HELP

    ds = esub.add_parser("dataset", help="the paper's settings for a dataset: " + ", ".join(DATASET_HELP),
                         description="\n".join(f"{k}: {v}" for k, v in DATASET_HELP.items()),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    ds.add_argument("name", metavar="DATASET", choices=list(DATASET_HELP))
    ds.add_argument("--root", required=True, type=existing_path,
                    help="where the dataset lives (CIFAR python batches, image folder)")
    ds.add_argument("--apply", action="store_true", help="only rewrite params.yaml (then `dvc params diff`, "
                                                          "`dvc repro`) instead of running a DVC experiment")
    ds.add_argument("-n", "--name", dest="exp_name", help="experiment name (default: NAME-paper)")
    _exp_args(ds)
    ds.set_defaults(fn=_dataset)
    r = sub.add_parser("report", help="markdown tables and plots of the experiments")
    r.add_argument("--out", default="reports/results.md", type=new_file)
    r.add_argument("--plots", default="reports/plots/sweeps")
    r.add_argument("--no-mlflow", action="store_true", help="do not cross-check the accuracies with MLflow")
    r.set_defaults(fn=_report)
    rp = sub.add_parser("results", help="the results page (docs/results.md, its plots) and README.md's headline "
                                        "from the experiments' trials, byte-identical on a rerun")
    rp.add_argument("--out", default=RESULTS_DEFAULTS["out"], type=new_file, help="the page (default: %(default)s)")
    rp.add_argument("--plots", default=RESULTS_DEFAULTS["plots"], help="its figures (default: %(default)s)")
    rm = rp.add_mutually_exclusive_group()
    rm.add_argument("--readme", default=RESULTS_DEFAULTS["readme"], type=existing_file,
                    help="the file whose block between the <!-- results-headline:start --> and <!-- "
                         "results-headline:end --> lines gets the page's headline (default: %(default)s)")
    rm.add_argument("--no-readme", dest="readme", action="store_const", const=None, help="write the page only")
    rp.add_argument("--commit", action="append", metavar="REV", type=_hex_prefix,
                    help="only the experiments that ran on this commit (its full or abbreviated hash; repeatable; "
                         "default: every commit's)")
    rp.add_argument("--no-mlflow", action="store_true", help="do not cross-check the accuracies with MLflow")
    rp.set_defaults(fn=_results)
    mt = sub.add_parser("metrics", help="the students' test and validation accuracy as a short table")
    mt.add_argument("file", nargs="?", default="reports/metrics.json")
    mt.set_defaults(fn=_metrics)
    ex = sub.add_parser("export", help="write a condensed set as an image folder with its soft labels and card")
    ex.add_argument("set", metavar="SET", type=condensed_set,
                    help="the set: a directory of shards (condensed/shards), an http(s) URL or pipe:")
    ex.add_argument("out", metavar="OUT", type=new_dir, help="a new folder")
    ex.add_argument("--format", choices=["imagefolder"], default="imagefolder")
    ex.set_defaults(fn=_export)
    ev = sub.add_parser("evaluate", help="train students of any architecture on any condensed sets or image "
                                         "folders, soft and hard labels, and print the cross-architecture table")
    ev.add_argument("sets", nargs="+", type=set_source, metavar="SET",
                    help="condensed sets (directory, URL, pipe:) or image folders <class>/<img>")
    ev.add_argument("--archs", nargs="+", required=True,
                    help="evaluate.students names, registry architectures (edc list) or torchvision:NAME")
    ev.add_argument("--labels", nargs="+", choices=["soft", "hard"], default=["soft", "hard"])
    ev.add_argument("--teachers", nargs="+", help="observers that label an image folder's views (soft labels)")
    ev.add_argument("--seeds", type=positive_int, help="seeds per cell (default: evaluate.seeds)")
    ev.add_argument("--data", default="data/prepared", type=existing_dir,
                    help="the prepared dataset whose test split is used")
    ev.add_argument("--observers", default="models/observers")
    ev.add_argument("--params", default="params.yaml", type=existing_file)
    ev.add_argument("--out", default="reports/evaluate.md", type=new_file, help="markdown table (and .json beside it)")
    ev.set_defaults(fn=_evaluate)
    sm = sub.add_parser("smoke", help="run the whole pipeline on tiny settings in a scratch copy (1-2 minutes)")
    sm.add_argument("--project", default=".", type=existing_dir,
                    help="the project to copy (default: the current directory)")
    sm.add_argument("--keep", type=new_dir,
                    help="run in this new directory and keep it (default: a temporary one, removed)")
    sm.set_defaults(fn=_smoke)
    rs = sub.add_parser("restore", help="after a failed stage under DVC: put back the outputs dvc.lock records "
                                        "(dvc checkout; metrics and plots from git HEAD) and params.yaml as committed")
    rs.add_argument("stages", nargs="*", metavar="STAGE", help="the stages to restore (default: all)")
    rs.add_argument("--keep-params", action="store_true",
                    help="keep params.yaml (and dvc.lock) as they are instead of putting back the committed ones")
    rs.set_defaults(fn=_restore)
    q = sub.add_parser("queue", help="run queued experiments side by side, the cores divided between them")
    qsub = q.add_subparsers(dest="queue_cmd", required=True)
    qs = qsub.add_parser("start", help="`dvc queue start -j N` with EDC_JOBS=N: each experiment's stages use "
                                       "cores // N torch threads (a task killed with its worker is marked failed "
                                       "first, and control messages left for workers that are gone dropped)")
    qs.add_argument("-j", "--jobs", type=positive_int, default=1, help="experiments side by side (default 1)")
    qs.add_argument("--watch", action="store_true",
                    help="stay until nothing is queued or running, and start again a worker that dies while "
                         "experiments wait (kombu's file broker can stop one: docs/performance.md), one line per "
                         "restart; recommended for long queues. Ctrl-C stops watching, not the workers")
    qs.set_defaults(fn=_queue_start)
    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except EdcError as exc:
        print(str(exc), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
