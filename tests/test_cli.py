"""The ``edc`` command line's bad-input catalogue, and ``edc restore``'s refusals.

Each mistake runs through ``edc.cli.main`` in a scratch project (the tiny params, a few files and
folders to name): it must end in ONE stderr line naming the option and the problem, exit status 2,
no traceback, nothing printed to stdout, nothing written, nothing launched. To add an option: one
row in CASES (argv, a piece of the line it must print).
"""

from __future__ import annotations

import argparse
import subprocess

import pytest

from edc import cli
from tests.helpers import md5_tree, tiny_params, write_yaml


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A scratch project to make mistakes in: params.yaml, an empty data/prepared, an observers
    folder, a folder with a file in it, a text file, an empty folder and a set whose meta.json is junk."""
    write_yaml(tmp_path / "params.yaml", tiny_params())
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "models/observers").mkdir(parents=True)
    (tmp_path / "models/observers/tiny.safetensors").write_bytes(b"")
    (tmp_path / "full").mkdir()
    (tmp_path / "full/notes.txt").write_text("not a set\n")
    (tmp_path / "notes.txt").write_text("not a set\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk/meta.json").write_text("{")
    monkeypatch.chdir(tmp_path)
    return tmp_path


EV = ["evaluate", "models", "--data", "data/prepared"]  # a folder of class folders: an image folder

# (id, argv, a piece of the one line it must print)
CASES = [
    # the command itself
    ("no-command", [], "the following arguments are required: COMMAND"),
    ("unknown-command", ["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
    ("unknown-option", ["list", "--verbose"], "unrecognized arguments: --verbose"),
    # check, stats
    ("check-params-missing", ["check", "--params", "nope.yaml"], "argument --params: nope.yaml: no such file"),
    ("check-params-a-folder", ["check", "--params", "full"], "argument --params: full: not a file"),
    ("stats-file-missing", ["stats", "stats/nope.safetensors"], "argument FILE: stats/nope.safetensors: no such"),
    ("stats-file-a-folder", ["stats", "full"], "argument FILE: full: not a file"),
    ("stats-not-a-stats-file", ["stats", "notes.txt"], "notes.txt: unreadable statistics file"),
    # exp preset
    ("preset-unknown", ["exp", "preset", "edc2"], "argument PRESET: invalid choice: 'edc2'"),
    ("preset-ipc-zero", ["exp", "preset", "edc", "--ipc", "0"], "argument --ipc: must be an integer >= 1 (got '0')"),
    ("preset-ipc-negative", ["exp", "preset", "edc", "--ipc", "-5"], "argument --ipc: must be an integer >= 1"),
    ("preset-ipc-not-a-number", ["exp", "preset", "edc", "--ipc", "ten"], "argument --ipc: must be an integer (got"),
    ("preset-ipc-fraction", ["exp", "preset", "edc", "--ipc", "1.5"], "argument --ipc: must be an integer (got"),
    ("preset-set-without-value", ["exp", "preset", "edc", "-S", "zeta"], "argument -S/--set: expected KEY=VALUE"),
    ("preset-set-bad-value", ["exp", "preset", "edc", "--dry-run", "-S", "relabel.teachers=[nosuch]"],
     "-S values: relabel.teachers[0]: 'nosuch' is not among observers.models"),
    ("preset-set-wrong-type", ["exp", "preset", "edc", "--dry-run", "-S", "evaluate.seeds=two"],
     "-S values: evaluate.seeds: must be an integer (got 'two')"),
    ("preset-set-unknown-key", ["exp", "preset", "edc", "--dry-run", "-S", "synth.iteration=5"],
     "-S/--set: Could not override 'synth.iteration'"),
    ("preset-set-syntax", ["exp", "preset", "edc", "--dry-run", "-S", "relabel.teachers=[tiny"], "-S/--set: "),
    ("preset-params-missing", ["exp", "preset", "edc", "--params", "nope.yaml"], "argument --params: nope.yaml"),
    # exp sweep
    ("sweep-unknown", ["exp", "sweep", "learning_rate"], "argument SWEEP: invalid choice: 'learning_rate'"),
    ("sweep-ipc-zero", ["exp", "sweep", "zeta", "--ipc", "0"], "argument --ipc: must be an integer >= 1"),
    ("sweep-value-wrong-type", ["exp", "sweep", "zeta", "--dry-run", "--values", "fast"],
     "-S values: zeta: must be a number"),
    ("sweep-value-out-of-range", ["exp", "sweep", "alpha", "--dry-run", "--values", "2"],
     "-S values: alpha: must be <= 1.0"),
    ("sweep-value-not-yaml", ["exp", "sweep", "zeta", "--values", "[1.5"], "argument --values: not a YAML value"),
    ("sweep-ipc-value-zero", ["exp", "sweep", "ipc", "--dry-run", "--values", "0"], "-S values: ipc: must be >= 1"),
    # exp dataset
    ("dataset-unknown", ["exp", "dataset", "mnist", "--root", "full"], "argument DATASET: invalid choice: 'mnist'"),
    ("dataset-root-needed", ["exp", "dataset", "cifar10"], "the following arguments are required: --root"),
    ("dataset-root-missing", ["exp", "dataset", "cifar10", "--root", "cifar"], "argument --root: cifar: no such"),
    ("dataset-ipc-negative", ["exp", "dataset", "cifar10", "--root", "full", "--ipc", "-1"], "argument --ipc: must"),
    ("dataset-apply-bad-set", ["exp", "dataset", "cifar10", "--root", "full", "--apply", "-S", "zeta=fast"],
     "-S values: zeta: must be a number"),
    # report
    ("report-out-a-folder", ["report", "--out", "full"], "argument --out: full: is a directory"),
    ("results-out-a-folder", ["results", "--out", "full"], "argument --out: full: is a directory"),
    ("results-readme-missing", ["results", "--readme", "nope.md"], "argument --readme: nope.md: no such file"),
    ("results-readme-no-markers", ["results", "--readme", "notes.txt"],
     "notes.txt: needs one <!-- results-headline:start --> line"),
    ("results-commit-not-a-hash", ["results", "--commit", "main"], "argument --commit: must be a commit hash"),
    # export
    ("export-set-missing", ["export", "condensed/shards", "out"], "argument SET: condensed/shards: no such file"),
    ("export-not-a-set", ["export", "full", "out"], "argument SET: full: not a condensed set (no meta.json"),
    ("export-set-junk-meta", ["export", "junk", "out"], "junk/meta.json: not JSON"),
    ("export-set-a-file", ["export", "notes.txt", "out"], "argument SET: notes.txt: not a directory"),
    ("export-out-not-empty", ["export", "https://example.org/set", "full"], "argument OUT: full: exists and is not"),
    ("export-out-a-file", ["export", "https://example.org/set", "notes.txt"], "argument OUT: notes.txt: exists"),
    ("export-format", ["export", "https://example.org/set", "out", "--format", "png"],
     "argument --format: invalid choice: 'png'"),
    # evaluate
    ("evaluate-archs-needed", EV, "the following arguments are required: --archs"),
    ("evaluate-unknown-torchvision", [*EV, "--archs", "torchvision:nosuchnet"],
     "--archs: torchvision has no classification model 'nosuchnet'"),
    ("evaluate-unknown-arch", [*EV, "--archs", "resnet9000"], "--archs: unknown architecture 'resnet9000'"),
    ("evaluate-seeds-zero", [*EV, "--archs", "student", "--seeds", "0"], "argument --seeds: must be an integer >= 1"),
    ("evaluate-seeds-negative", [*EV, "--archs", "student", "--seeds", "-1"], "argument --seeds: must be an integer"),
    ("evaluate-seeds-word", [*EV, "--archs", "student", "--seeds", "three"], "argument --seeds: must be an integer"),
    ("evaluate-set-missing", ["evaluate", "nope", "--archs", "student", "--data", "data/prepared"],
     "argument SET: nope: no such file or directory"),
    ("evaluate-set-a-file", ["evaluate", "notes.txt", "--archs", "student", "--data", "data/prepared"],
     "argument SET: notes.txt: not a directory"),
    ("evaluate-set-not-a-set", ["evaluate", "empty", "--archs", "student", "--data", "data/prepared"],
     "argument SET: empty: neither a condensed set (no meta.json) nor an image folder"),
    ("evaluate-labels", [*EV, "--archs", "student", "--labels", "soft", "fuzzy"], "argument --labels: invalid choice"),
    ("evaluate-data-missing", ["evaluate", "models", "--archs", "student", "--data", "data/prep"],
     "argument --data: data/prep: no such file"),
    ("evaluate-data-not-prepared", [*EV, "--archs", "student", "--labels", "hard"],
     "data/prepared/facts.json: not found; is data/prepared the output of the prepare stage?"),
    ("evaluate-folder-without-teachers", [*EV, "--archs", "student"],
     "models: an image folder has no stored soft labels; name --teachers"),
    ("evaluate-teacher-unknown", [*EV, "--archs", "student", "--teachers", "ghost"],
     "--teachers: no observer 'ghost' in --observers models/observers (it has: tiny)"),
    ("evaluate-out-a-folder", [*EV, "--archs", "student", "--out", "full"], "argument --out: full: is a directory"),
    ("evaluate-params-missing", [*EV, "--archs", "student", "--params", "nope.yaml"], "argument --params: nope.yaml"),
    # smoke
    ("smoke-keep-not-empty", ["smoke", "--keep", "full"], "argument --keep: full: exists and is not an empty"),
    ("smoke-project-missing", ["smoke", "--project", "nope"], "argument --project: nope: no such file"),
    # restore (the scratch project is no git repository)
    ("restore-no-dvc-yaml", ["restore"], "edc restore: no dvc.yaml here"),
    # trials (--trials, the trial key)
    ("preset-trials-zero", ["exp", "preset", "edc", "--trials", "0"], "argument --trials: must be an integer >= 1"),
    ("preset-trials-word", ["exp", "preset", "edc", "--trials", "five"], "argument --trials: must be an integer"),
    ("sweep-trials-negative", ["exp", "sweep", "zeta", "--trials", "-1"], "argument --trials: must be an integer >= 1"),
    ("preset-trials-and-trial", ["exp", "preset", "edc", "--dry-run", "--trials", "2", "-S", "trial=1"],
     "--trials sets the param trial of each experiment"),
    ("preset-set-trial-negative", ["exp", "preset", "edc", "--dry-run", "-S", "trial=-1"], "trial: must be >= 0"),
    ("preset-set-variant-unknown", ["exp", "preset", "edc", "--dry-run", "-S", "evaluate.variants=[fuzzy]"],
     "evaluate.variants[0]: must be one of 'hard' or 'noaug'"),
    # label codecs and stored epochs
    ("sweep-codec-unknown", ["exp", "sweep", "codec", "--dry-run", "--values", "int4"],
     "relabel.codec: must be one of 'float16', 'int8' or 'hard' (got 'int4')"),
    ("preset-set-label-epochs-negative", ["exp", "preset", "edc", "--dry-run", "-S", "relabel.label_epochs=-1"],
     "relabel.label_epochs: must be >= 0 (got -1)"),
    # side-by-side experiments
    ("queue-jobs-zero", ["queue", "start", "-j", "0"], "argument -j/--jobs: must be an integer >= 1 (got '0')"),
    ("queue-jobs-word", ["queue", "start", "-j", "x"], "argument -j/--jobs: must be an integer (got 'x')"),
]


def test_the_catalogue_covers_every_command():
    names = {c[0] for c in CASES}
    assert len(names) == len(CASES)
    commands = {"check", "stats", "preset", "sweep", "dataset", "report", "export", "evaluate", "smoke", "restore",
                "queue", "results"}
    assert commands <= {c[0].split("-")[0] for c in CASES}


@pytest.mark.parametrize("argv,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_command_line_mistake_is_one_line_exit_2_and_writes_nothing(project, capsys, argv, message):
    before = md5_tree(project)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert out == ""
    assert md5_tree(project) == before


@pytest.mark.parametrize("fn,good,bad", [
    (cli.positive_int, [("1", 1), ("12", 12)], ["0", "-1", "1.0", "x", ""]),
])
def test_count_types(fn, good, bad):
    for text, value in good:
        assert fn(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            fn(text)


def test_path_types(project):
    assert cli.existing_path("full") == "full" and cli.existing_file("notes.txt") == "notes.txt"
    assert cli.existing_dir("full") == "full"
    assert cli.new_dir("empty") == "empty" and cli.new_dir("not/yet") == "not/yet"
    assert cli.new_file("reports/x.md") == "reports/x.md"
    assert cli.set_source("pipe:cat x") == "pipe:cat x" and cli.set_source("data") == "data"  # class folders
    for fn, text in [(cli.existing_path, "nope"), (cli.existing_file, "full"), (cli.existing_dir, "notes.txt"),
                     (cli.new_dir, "full"), (cli.new_dir, "notes.txt"), (cli.new_file, "full"),
                     (cli.set_source, "empty"), (cli.condensed_set, "full")]:
        with pytest.raises(argparse.ArgumentTypeError):
            fn(text)


def test_dry_runs_pass_the_checks(project, capsys):
    """The checks let good input through: the dvc commands are printed with the values asked for."""
    cli.main(["exp", "preset", "edc", "--ipc", "3", "--dry-run", "-S", "relabel.epochs=3"])
    out = capsys.readouterr().out
    assert "-n edc-ipc3" in out and "-S ipc=3" in out and "-S relabel.epochs=3" in out
    cli.main(["exp", "sweep", "zeta", "--values", "1.5", "--dry-run"])
    assert "-S zeta=1.5" in capsys.readouterr().out


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=repo, check=True,
                   capture_output=True)


@pytest.mark.parametrize("setup,argv,message", [
    ("no-commit", ["restore"], "edc restore: no git HEAD"),
    ("no-lock", ["restore"], "edc restore: no dvc.lock, neither here nor in git HEAD"),
    ("lock", ["restore", "relabel", "sythesize"], "edc restore: unknown stage 'sythesize' (dvc.yaml has: prepare,"),
])
def test_restore_refuses_when_there_is_nothing_to_restore(project, capsys, setup, argv, message):
    from tests.helpers import ROOT

    (project / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    _git(project, "init", "-q")
    if setup != "no-commit":
        if setup == "lock":
            (project / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
        _git(project, "add", "-A")
        _git(project, "commit", "-qm", "x")
    before = md5_tree(project)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert md5_tree(project) == before


def test_the_hint_names_edc_restore_and_what_it_puts_back(project, monkeypatch):
    from edc.stage import restore_hint

    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(project))
    assert restore_hint() is None  # not under DVC: nothing was deleted
    monkeypatch.setenv("DVC_STAGE", "relabel")
    plain = restore_hint()
    assert "`edc restore relabel`" in plain and "metrics and plots from git HEAD" in plain
    assert "params.yaml" not in plain  # no git HEAD to differ from
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    assert "params.yaml and dvc.lock as committed: `dvc exp run -S` left its values there" in restore_hint()
    temp = project / ".dvc/tmp/exps/tmp123"
    temp.mkdir(parents=True)
    monkeypatch.chdir(temp)
    assert "the workspace itself is as it was" in restore_hint()


def test_restore_names_the_params_keys_it_puts_back():
    from edc.restore import params_changes

    committed = b"ipc: 10\nrelabel:\n  teachers: [a, b]\n  epochs: 3\nzeta: 2.0\n"
    current = b"ipc: 10\nrelabel:\n  teachers: [nosuch]\n  epochs: 3\nalpha: 0.5\n"
    assert params_changes(committed, current) == [
        "alpha: 0.5 (committed: '(absent)')", "relabel.teachers: ['nosuch'] (committed: ['a', 'b'])",
        "zeta: '(absent)' (committed: 2.0)"]
    assert params_changes(committed, b"ipc: [unclosed\n") == []  # unreadable: put back whole, no key named
