"""params.yaml validation: every problem is one line naming the dotted key, and stages stop early."""

from __future__ import annotations

import sys

import pytest

from edc.errors import ParamsError
from edc.io import write_csv
from edc.params import get_dotted, load_params, parse_params, set_dotted
from edc.stage import stage_main
from tests.helpers import ROOT, run, stage, write_yaml


def problems(data: dict) -> list[str]:
    with pytest.raises(ParamsError) as exc:
        parse_params(data)
    return exc.value.problems


def test_repository_params_are_valid():
    p = load_params(ROOT / "params.yaml")
    assert p.dataset.name == "mnist5k"
    assert len({m.arch for m in p.observers.models}) >= 3, "default observers: at least three architectures"


def test_smoke_settings_are_valid_params_and_tiny(default_params):
    """`edc smoke` (make smoke) runs params.yaml shrunk: still valid, and small enough for a minute."""
    from edc.smoke import smoke_params

    p = parse_params(smoke_params(default_params))
    assert p.ipc == 1 and p.evaluate.seeds == 1 and p.observers.epochs == 1 and p.synth.iterations <= 20
    assert len(p.observers.models) == 1 and p.relabel.teachers == p.synth.observers == ["convnet"]
    assert default_params["ipc"] == 10, "smoke_params must not change the dict it is given"


def test_exponent_notation_is_a_float_as_dvc_reads_it(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text((ROOT / "params.yaml").read_text().replace("weight_decay: 5e-4", "weight_decay: 1e-3"))
    assert load_params(f).observers.weight_decay == pytest.approx(1e-3)


@pytest.mark.parametrize("mutate, expected", [
    (lambda p: p["observers"].__setitem__("epochs", 0), "observers.epochs: must be >= 1 (got 0)"),
    (lambda p: p.__setitem__("alpha", 1.5), "alpha: must be <= 1.0 (got 1.5)"),
    (lambda p: p.__setitem__("zeta", 0), "zeta: must be > 0.0 (got 0)"),
    (lambda p: p.__setitem__("ipc", 0), "ipc: must be >= 1 (got 0)"),
    (lambda p: p.__setitem__("trial", -1), "trial: must be >= 0 (got -1)"),
    (lambda p: p["evaluate"].__setitem__("variants", ["soft"]), "evaluate.variants[0]: must be one of"),
    (lambda p: p["evaluate"].__setitem__("variants", ["hard", "hard"]), "evaluate.variants: each variant at most once"),
    (lambda p: p["reference"].__setitem__("epochs", 0), "reference.epochs: must be >= 1 (got 0)"),
    (lambda p: p["observers"].__setitem__("epochz", 3), "observers.epochz: unknown key"),
    (lambda p: p["observers"]["augment"].__setitem__("rotate", 3), "observers.augment.rotate: unknown key"),
    (lambda p: p.pop("stats"), "stats: missing"),
    (lambda p: p["observers"].__setitem__("lr", "0.1"), "observers.lr: must be a number (got '0.1')"),
    (lambda p: p["observers"].__setitem__("epochs", 2.5), "observers.epochs: must be an integer (got 2.5)"),
    (lambda p: p["observers"]["augment"].__setitem__("flip", "yes"),
     "observers.augment.flip: must be true or false (got 'yes')"),
    (lambda p: p["dataset"].__setitem__("name", "svhn"), "dataset.name: must be one of"),
    (lambda p: p["dataset"].__setitem__("name", "cifar10"), "dataset.root: required for dataset 'cifar10'"),
    (lambda p: p["observers"]["models"][1].__setitem__("arch", "vgg"),
     "observers.models[1].arch: unknown architecture 'vgg'"),
    (lambda p: p["observers"]["models"][1]["kwargs"].__setitem__("depth", 3),
     "observers.models[1].kwargs: depth not accepted by resnet18"),
    (lambda p: p["observers"]["models"][1].__setitem__("name", p["observers"]["models"][0]["name"]),
     "observers.models: observer names must be unique"),
    (lambda p: p.__setitem__("stats", 3), "stats: must be a mapping"),
    (lambda p: p["relabel"].__setitem__("codec", "int4"),
     "relabel.codec: must be one of 'float16', 'int8' or 'hard' (got 'int4')"),
    (lambda p: p["relabel"].update(codec="hard", topk=3),
     "relabel.topk: must be 0 with relabel.codec: hard (no logits are stored)"),
    (lambda p: (p["relabel"].update(codec="hard"), p["evaluate"].update(loss="mse_ce")),
     "evaluate.loss: mse_ce regresses logits; relabel.codec: hard stores none"),
    (lambda p: p["relabel"].__setitem__("label_epochs", -1), "relabel.label_epochs: must be >= 0 (got -1)"),
])
def test_each_problem_is_one_line_naming_the_key(default_params, mutate, expected):
    mutate(default_params)
    lines = problems(default_params)
    assert len(lines) == 1, lines
    assert lines[0].startswith(expected), lines


def test_all_problems_are_reported_at_once(default_params):
    default_params["observers"]["epochs"] = 0
    default_params["alpha"] = -1
    assert len(problems(default_params)) == 2


def test_yaml_syntax_error_names_the_line(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("seed: 0\nobservers: [unclosed\n")
    with pytest.raises(ParamsError) as exc:
        load_params(f)
    assert str(exc.value).startswith(f"{f}: YAML syntax error at line ")


def _run_stage(*args):
    return run([sys.executable, *args], timeout=300)


@pytest.mark.parametrize("bad", ["unknown_key", "out_of_range", "wrong_type", "syntax", "missing_section"])
def test_a_bad_params_file_stops_the_stage_and_leaves_outputs_untouched(tmp_path, default_params, capsys, bad):
    f = tmp_path / "params.yaml"
    if bad == "syntax":
        f.write_text("seed: 0\ndataset: {name: mnist5k\n")
    else:
        {"unknown_key": lambda p: p["dataset"].__setitem__("nmae", "x"),
         "out_of_range": lambda p: p["observers"].__setitem__("epochs", 0),
         "wrong_type": lambda p: p.__setitem__("seed", "zero"),
         "missing_section": lambda p: p.pop("observers")}[bad](default_params)
        write_yaml(f, default_params)
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "facts.json").write_text("earlier output")
    argv = ["--params", str(f), "--out", str(out)]
    if bad == "syntax":  # one case as DVC runs the script, a process of its own
        r = _run_stage("stages/prepare.py", *argv)
        code, err = r.returncode, r.stderr
    else:  # the others through the same stage_main in this process: a process each would take seconds
        with pytest.raises(SystemExit) as exit_info:
            stage_main(stage("prepare"), argv)
        code, err = exit_info.value.code, capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{f}: "), err
    assert "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["facts.json"]
    assert (out / "facts.json").read_text() == "earlier output"


def test_edc_check_reports_ok_and_problems(tmp_path, default_params, capsys):
    r = _run_stage("-m", "edc.cli", "check", "--params", str(ROOT / "params.yaml"))
    assert r.returncode == 0 and "OK" in r.stdout
    from edc import cli

    default_params["observers"]["epochs"] = 0
    with pytest.raises(SystemExit) as exit_info:  # the same main in this process: a second one takes seconds
        cli.main(["check", "--params", str(write_yaml(tmp_path / "p.yaml", default_params))])
    assert exit_info.value.code == 2 and "observers.epochs: must be >= 1 (got 0)" in capsys.readouterr().err


def test_dotted_keys_read_and_write_the_nested_sections():
    tree = {"relabel": {"epochs": 3, "aug": {"flip": True}}, "seed": 0}
    assert get_dotted(tree, "relabel.aug.flip") is True and get_dotted(tree, "seed") == 0
    assert get_dotted(tree, "relabel.nope", "absent") == "absent" and get_dotted(tree, "seed.x", 1) == 1
    set_dotted(tree, "relabel.aug.flip", False)
    set_dotted(tree, "synth.flatness.weight", 0.5)  # sections that are not there yet are created
    set_dotted(tree, "seed", 4)
    assert tree == {"relabel": {"epochs": 3, "aug": {"flip": False}}, "seed": 4,
                    "synth": {"flatness": {"weight": 0.5}}}


def test_write_csv_chooses_the_columns_and_rounds_floats_only_when_asked(tmp_path):
    rows = [{"a": 1, "b": 1 / 3, "extra": "left out"}, {"a": 2, "b": 0.5}]
    write_csv(tmp_path / "r.csv", rows, ["a", "b"])
    assert (tmp_path / "r.csv").read_bytes() == b"a,b\r\n1,0.333333\r\n2,0.5\r\n"
    write_csv(tmp_path / "r.csv", rows, ["b", "a"], digits=None)  # replaces the file whole
    assert (tmp_path / "r.csv").read_bytes() == b"b,a\r\n0.3333333333333333,1\r\n0.5,2\r\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]  # no temporary left behind
